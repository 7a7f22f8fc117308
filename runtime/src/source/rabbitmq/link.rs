//! One AMQP connection, made when first needed and made again when lost.
//! Callers ask for the connection (or a new channel on it) each time they
//! (re)open something; a lost connection is replaced by the next caller,
//! one attempt at a time.

use std::sync::Arc;
use std::time::Duration;

use lapin::tcp::OwnedTLSConfig;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties};

use super::RabbitSource;

/// A connection that is made again when lost.
pub(super) struct Link {
    uri: AMQPUri,
    properties: ConnectionProperties,
    /// A CA certificate chain (PEM) to trust, besides the system's.
    cert_chain: Option<String>,
    timeout: Duration,
    /// `amqp://host:port/vhost`, without credentials: for log lines.
    pub(super) label: String,
    /// `consume` or `publish`.
    role: &'static str,
    current: tokio::sync::Mutex<Option<Arc<Connection>>>,
}

impl Link {
    /// A link for `role` (`consume`, `publish`) with `source`'s settings.
    pub(super) fn new(source: &RabbitSource, role: &'static str) -> anyhow::Result<Self> {
        let mut uri: AMQPUri = source
            .url
            .parse()
            .map_err(|err| anyhow::anyhow!("[source.rabbitmq] url: {err}"))?;
        if uri.query.heartbeat.is_none() {
            uri.query.heartbeat = Some(u16::try_from(source.heartbeat.as_secs()).unwrap_or(0));
        }
        if uri.query.connection_timeout.is_none() {
            uri.query.connection_timeout =
                Some(u64::try_from(source.connect_timeout.as_millis()).unwrap_or(u64::MAX));
        }
        let cert_chain = match &source.tls_ca_file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|err| {
                anyhow::anyhow!(
                    "[source.rabbitmq] tls_ca_file {}: cannot read it: {err}",
                    path.display()
                )
            })?),
            None => None,
        };
        let label = format!(
            "{}://{}:{}/{}",
            if matches!(uri.scheme, lapin::uri::AMQPScheme::AMQPS) {
                "amqps"
            } else {
                "amqp"
            },
            uri.authority.host,
            uri.authority.port,
            if uri.vhost == "/" {
                "%2f"
            } else {
                uri.vhost.as_str()
            }
        );
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("{} ({role})", source.connection_name).into());
        Ok(Self {
            uri,
            properties,
            cert_chain,
            timeout: source.connect_timeout,
            label,
            role,
            current: tokio::sync::Mutex::new(None),
        })
    }

    /// The connection, connecting (once) if there is none or it was lost.
    /// Cancel-safe: a cancelled attempt leaves nothing behind.
    ///
    /// # Errors
    ///
    /// When the broker cannot be reached or refuses the connection.
    pub(super) async fn connection(&self) -> anyhow::Result<Arc<Connection>> {
        let mut current = self.current.lock().await;
        if let Some(connection) = current.as_ref() {
            if connection.status().connected() {
                return Ok(connection.clone());
            }
            tracing::warn!(broker = %self.label, role = self.role,
                "the RabbitMQ connection was lost; reconnecting (what was delivered and not acknowledged on it is redelivered)");
            *current = None;
        }
        let attempt = Connection::connect_uri_with_config(
            self.uri.clone(),
            self.properties.clone(),
            OwnedTLSConfig {
                identity: None,
                cert_chain: self.cert_chain.clone(),
            },
        );
        let connection = match tokio::time::timeout(self.timeout + Duration::from_secs(1), attempt)
            .await
        {
            Ok(Ok(connection)) => connection,
            Ok(Err(err)) => anyhow::bail!("cannot connect to RabbitMQ at {}: {err}", self.label),
            Err(_) => anyhow::bail!(
                "cannot connect to RabbitMQ at {}: no answer within {:?}",
                self.label,
                self.timeout
            ),
        };
        tracing::info!(broker = %self.label, role = self.role, "connected to RabbitMQ");
        let connection = Arc::new(connection);
        *current = Some(connection.clone());
        Ok(connection)
    }

    /// A new channel on the connection.
    ///
    /// # Errors
    ///
    /// When there is no connection, or the broker refuses the channel.
    pub(super) async fn channel(&self) -> anyhow::Result<Channel> {
        let connection = self.connection().await?;
        connection
            .create_channel()
            .await
            .map_err(|err| anyhow::anyhow!("cannot open a channel on {}: {err}", self.label))
    }
}
