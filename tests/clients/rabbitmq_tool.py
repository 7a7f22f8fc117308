"""An independent RabbitMQ client for Weir's integration tests (pika 1.3).

Commands (each prints one JSON document on stdout):

  declare --queue Q        makes sure durable queue Q exists (an existing one
                           is left as it is); prints {"queue", "ready", "consumers"}
  publish --queue Q        publishes the JSON records on stdin (one a line:
                           {"value_hex", "headers": [[name, value_hex]...],
                           "message_id"}) to the default exchange with routing
                           key Q, persistent and mandatory, with publisher
                           confirms; prints the message ids confirmed, in order
  read --queue Q           every message Q holds, in queue order, WITHOUT
                           consuming it: basic.get each without acknowledging,
                           then the connection closes and the broker requeues
                           them all ([] when Q does not exist)
  count --queue Q          {"exists", "ready", "consumers"} from a passive declare
  drain --queue Q --count N --prefetch P
                           consumes N messages with manual acks (the raw-client
                           yardstick of the throughput measurement); prints
                           {"consumed", "seconds"}

Header values are written as text when they are UTF-8, else as bytes; read
reports every value as hex of its bytes (numbers and booleans as text).
"""

import argparse
import json
import sys

import pika
from pika.exceptions import ChannelClosedByBroker, UnroutableError

NOT_FOUND = 404


def connect(url):
    params = pika.URLParameters(url)
    params.connection_attempts = 2
    params.retry_delay = 0.2
    params.socket_timeout = 10
    params.blocked_connection_timeout = 30
    try:
        return pika.BlockingConnection(params)
    except Exception as err:  # noqa: BLE001 - reported with the URL
        raise SystemExit(f"cannot connect to {url}: {err!r}") from None


def passive(connection, queue):
    """(ready, consumers) of queue, or None when it does not exist."""
    channel = connection.channel()
    try:
        ok = channel.queue_declare(queue=queue, passive=True)
    except ChannelClosedByBroker as err:
        if err.reply_code == NOT_FOUND:
            return None
        raise
    result = (ok.method.message_count, ok.method.consumer_count)
    channel.close()
    return result


def declare(connection, args):
    found = passive(connection, args.queue)
    if found is None:
        channel = connection.channel()
        ok = channel.queue_declare(queue=args.queue, durable=True)
        found = (ok.method.message_count, ok.method.consumer_count)
        channel.close()
    return {"queue": args.queue, "ready": found[0], "consumers": found[1]}


def header_value(value_hex):
    raw = bytes.fromhex(value_hex)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def publish(connection, args):
    channel = connection.channel()
    channel.confirm_delivery()
    confirmed = []
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        record = json.loads(line)
        headers = {}
        for name, value_hex in record.get("headers") or []:
            if name in headers:
                raise SystemExit(f"header {name!r} given twice: an AMQP header table has one value a name")
            headers[name] = header_value(value_hex)
        properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=record["message_id"],
            headers=headers or None,
        )
        try:
            channel.basic_publish(exchange="", routing_key=args.queue,
                                  body=bytes.fromhex(record["value_hex"]),
                                  properties=properties, mandatory=True)
        except UnroutableError:
            raise SystemExit(f"no queue {args.queue!r}: declare it first") from None
        confirmed.append(record["message_id"])
    channel.close()
    return confirmed


def as_bytes(value):
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bool):
        return b"true" if value else b"false"
    return str(value).encode("utf-8")


def read(connection, args):
    if passive(connection, args.queue) is None:
        return []
    channel = connection.channel()
    messages = []
    while True:
        method, properties, body = channel.basic_get(queue=args.queue, auto_ack=False)
        if method is None:
            break
        headers = properties.headers or {}
        messages.append({
            "exchange": method.exchange,
            "routing_key": method.routing_key,
            "redelivered": method.redelivered,
            "message_id": properties.message_id,
            "correlation_id": properties.correlation_id,
            "timestamp": properties.timestamp,
            "value_hex": body.hex(),
            "headers": [[name, as_bytes(value).hex()] for name, value in headers.items()],
        })
    # Nothing was acknowledged: closing the connection requeues every
    # message read, in its place.
    return messages


def count(connection, args):
    found = passive(connection, args.queue)
    if found is None:
        return {"exists": False, "ready": 0, "consumers": 0}
    return {"exists": True, "ready": found[0], "consumers": found[1]}


def drain(connection, args):
    import time
    channel = connection.channel()
    channel.basic_qos(prefetch_count=args.prefetch)
    consumed = 0
    start = None
    for method, _properties, _body in channel.consume(args.queue, inactivity_timeout=60):
        if method is None:
            # A short drain would make the rate look better than it is.
            raise SystemExit(f"drain {args.queue}: {consumed} of {args.count} messages, "
                             "then nothing for 60 s")
        if start is None:
            start = time.monotonic()
        channel.basic_ack(method.delivery_tag)
        consumed += 1
        if consumed >= args.count:
            break
    seconds = time.monotonic() - start if start is not None else 0.0
    channel.cancel()
    return {"consumed": consumed, "seconds": seconds}


COMMANDS = {
    "declare": declare,
    "publish": publish,
    "read": read,
    "count": count,
    "drain": drain,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        p = sub.add_parser(name)
        p.add_argument("--url", required=True)
        p.add_argument("--queue", required=True)
        if name == "drain":
            p.add_argument("--count", type=int, required=True)
            p.add_argument("--prefetch", type=int, default=256)
    args = parser.parse_args()
    connection = connect(args.url)
    try:
        result = COMMANDS[args.command](connection, args)
    finally:
        try:
            connection.close()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
