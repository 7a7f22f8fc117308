//! Waits that end early when the process stops.
//!
//! A leaf: it imports nothing of the crate.

use std::time::Duration;

use tokio::sync::watch;

/// Sleeps for `how_long` unless `stop` turns `true` (or its sender is
/// gone) first. `true` when the whole time was slept and nothing stopped.
pub async fn slept(stop: &mut watch::Receiver<bool>, how_long: Duration) -> bool {
    let finished = tokio::select! {
        _ = stop.wait_for(|stop| *stop) => false,
        _ = tokio::time::sleep(how_long) => true,
    };
    finished && !*stop.borrow()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stop_ends_the_sleep_and_says_so() {
        let (stop, mut stopping) = watch::channel(false);
        assert!(slept(&mut stopping, Duration::from_millis(1)).await);
        let waiting =
            tokio::spawn(async move { slept(&mut stopping, Duration::from_secs(3600)).await });
        stop.send_replace(true);
        assert!(!waiting.await.expect("joined"));
        let (_, mut gone) = {
            let (sender, receiver) = watch::channel(false);
            drop(sender);
            ((), receiver)
        };
        assert!(!slept(&mut gone, Duration::from_secs(3600)).await);
    }
}
