"""An independent Kafka client for Weir's integration tests (kafka-python).

Tested with kafka-python 2.3.3 (Python 3.11-3.13) against tansu 0.6.0 and
librdkafka's mock cluster (weir's embedded broker). 2.0.2 cannot be imported
on Python >= 3.12; 3.x cannot bootstrap from the mock cluster.

Every subcommand takes --ssl-cafile (speak TLS) and --sasl-user with
--sasl-password (authenticate with SCRAM-SHA-512).

Subcommands print one JSON document on stdout:
  create-topic --bootstrap B --topic T --partitions N
  produce      --bootstrap B --topic T     (JSON lines on stdin:
               {"partition": int|null, "key_hex": str|null, "value_hex": str,
                "headers": [[name, value_hex], ...]})  -> [[partition, offset], ...]
               a name "hex:<hex>" is sent as those raw bytes (not UTF-8, say)
  committed    --bootstrap B --group G --topic T -> {"<partition>": offset or null}
  consume      --bootstrap B --topic T --max N --timeout-ms MS -> [record, ...]
               every record from the beginning, at most N: the read ends once
               every partition has answered a fetch and has been read to the
               end the broker reported in its answers (its high watermark),
               or, after every partition has answered, when nothing new came
               for MS (a broker whose reported end is off). A slow broker
               makes the read longer, never short: the quiet gap counts only
               from the first answer of the last partition to answer. A
               progress line on stderr per answer that brought records.
"""

import argparse
import json
import sys
import time

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError


def unhex(value):
    return None if value is None else bytes.fromhex(value)


def partitions_of(consumer, topic):
    parts = consumer.partitions_for_topic(topic) or set()
    return [TopicPartition(topic, p) for p in sorted(parts)]


def connection(args):
    """The client settings for the broker: plaintext, or TLS trusting
    --ssl-cafile, with SCRAM-SHA-512 as --sasl-user (and --sasl-password)
    when given."""
    settings = {"bootstrap_servers": args.bootstrap}
    if args.ssl_cafile:
        settings.update(security_protocol="SSL", ssl_cafile=args.ssl_cafile,
                        ssl_check_hostname=True)
    if args.sasl_user:
        settings.update(security_protocol="SASL_SSL" if args.ssl_cafile else "SASL_PLAINTEXT",
                        sasl_mechanism="SCRAM-SHA-512",
                        sasl_plain_username=args.sasl_user,
                        sasl_plain_password=args.sasl_password)
    return settings


def create_topic(args):
    admin = KafkaAdminClient(**connection(args), client_id="weir-tests")
    try:
        admin.create_topics([NewTopic(args.topic, args.partitions, 1)])
    except TopicAlreadyExistsError:
        pass
    finally:
        admin.close()
    return {"topic": args.topic, "partitions": args.partitions}


class RawName(str):
    """A header name sent as the bytes it stands for: kafka-python encodes
    each name with str.encode, which this returns the raw bytes from."""

    def __new__(cls, raw):
        name = super().__new__(cls, raw.decode("utf-8", "replace"))
        name.raw = raw
        return name

    def encode(self, *args, **kwargs):
        return self.raw


def header_name(name):
    """A header name as given: "hex:<hex>" is a name of those raw bytes
    (which need not be UTF-8), any other is itself."""
    if name.startswith("hex:"):
        return RawName(bytes.fromhex(name[4:]))
    return name


def produce(args):
    # One record per batch: tansu 0.6 (in-memory storage) cannot fetch from
    # an offset inside a multi-record batch, which a consumer resuming from
    # a committed offset or after a pause needs.
    producer = KafkaProducer(**connection(args), acks="all", linger_ms=0,
                             batch_size=0, max_request_size=16 * 1024 * 1024)
    futures = []
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        record = json.loads(line)
        headers = [(header_name(name), bytes.fromhex(value))
                   for name, value in record.get("headers") or []]
        futures.append(producer.send(
            args.topic,
            value=bytes.fromhex(record["value_hex"]),
            key=unhex(record.get("key_hex")),
            headers=headers,
            partition=record.get("partition"),
        ))
    producer.flush()
    result = []
    for future in futures:
        meta = future.get(timeout=30)
        result.append([meta.partition, meta.offset])
    producer.close()
    return result


def committed(args):
    # Reads the group's committed offsets (OffsetFetch) without joining it.
    consumer = KafkaConsumer(**connection(args), group_id=args.group,
                             enable_auto_commit=False)
    try:
        return {str(tp.partition): consumer.committed(tp)
                for tp in partitions_of(consumer, args.topic)}
    finally:
        consumer.close()


def consume(args):
    consumer = KafkaConsumer(**connection(args), enable_auto_commit=False,
                             auto_offset_reset="earliest")
    try:
        parts = partitions_of(consumer, args.topic)
        if not parts:
            return []
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        records = []
        quiet_since = None
        while len(records) < args.max:
            batches = consumer.poll(timeout_ms=200, max_records=args.max - len(records))
            got = 0
            for tp in sorted(batches, key=lambda tp: tp.partition):
                for message in batches[tp]:
                    records.append({
                        "partition": message.partition,
                        "offset": message.offset,
                        "key_hex": None if message.key is None else message.key.hex(),
                        "value_hex": (message.value or b"").hex(),
                        "headers": [[name, (value or b"").hex()]
                                    for name, value in message.headers],
                    })
                    got += 1
            if got:
                print(f"consume {args.topic}: {len(records)} records", file=sys.stderr,
                      flush=True)
            # highwater() is known once the partition has answered a fetch.
            ends = {tp: consumer.highwater(tp) for tp in parts}
            if any(end is None for end in ends.values()):
                continue
            if all(consumer.position(tp) >= end for tp, end in ends.items()):
                break
            if got:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= args.timeout_ms / 1000:
                break
        return records[:args.max]
    finally:
        consumer.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ["create-topic", "produce", "committed", "consume"]:
        p = sub.add_parser(name)
        p.add_argument("--bootstrap", required=True)
        p.add_argument("--ssl-cafile", help="speak TLS, trusting this CA (PEM)")
        p.add_argument("--sasl-user", help="authenticate with SCRAM-SHA-512 as this user")
        p.add_argument("--sasl-password", help="the --sasl-user's password")
        p.add_argument("--topic", required=True)
        if name == "create-topic":
            p.add_argument("--partitions", type=int, required=True)
        if name == "committed":
            p.add_argument("--group", required=True)
        if name == "consume":
            p.add_argument("--max", type=int, default=1_000_000)
            p.add_argument("--timeout-ms", type=int, default=5000)
    args = parser.parse_args()
    handler = {
        "create-topic": create_topic,
        "produce": produce,
        "committed": committed,
        "consume": consume,
    }[args.command]
    json.dump(handler(args), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
