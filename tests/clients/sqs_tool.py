"""An independent SQS client for Weir's integration tests (boto3).

Tested with boto3 1.35 against moto 5.0 (server mode). Any credentials do;
the region is us-east-1.

Subcommands print one JSON document on stdout:
  create-queue --endpoint E --name Q
               creates queue Q (FIFO when Q ends in ".fifo"); an existing
               one is left as it is  -> {"url": U}
  produce    --endpoint E --name Q  (JSON lines on stdin:
               {"key_hex": str|null, "value_hex": str,
                "headers": [[name, value_hex], ...]})
               sends them in order, ten at a time (SendMessageBatch); the
               key goes in the "ce-partitionkey" attribute (and is the
               MessageGroupId on a FIFO queue, whose deduplication id is
               random), each header in an attribute of its own (String when
               UTF-8, else Binary); a progress line on stderr per batch
               -> [{"queue_url", "message_id"}, ...]
  read       --endpoint E --name Q [--visibility-timeout SECONDS]
               every message the queue holds, WITHOUT consuming it: receives
               until it has seen as many messages as the queue said it held
               when the read began, or until two answers in a row bring
               nothing new; then makes every message it saw visible again;
               [] if the queue does not exist. Each received message stays
               invisible for the visibility timeout (default 900 s, SQS's
               longest is 12 h), far longer than any read takes, so a slow
               server never shows the first messages again before the read
               ends; a message seen twice all the same (a shorter timeout)
               is not new and cannot keep the read going. Writes a progress
               line on stderr per answer. Weir's packing is undone: "weir.headers" (a JSON
               array of [name, value] pairs, a value being a string or
               {"base64": ...}) becomes headers after the attributes, and a
               body with "weir.body-encoding" = "base64" is decoded.
               -> [{"queue_url", "message_id", "value_hex", "key_hex",
                    "headers": [[name, value_hex], ...], "group_id",
                    "receive_count"}, ...]
               (attributes in name order, then the packed headers). On a
               FIFO queue only each message group's first batch can be seen
               this way.
  counts     --endpoint E --name Q
               -> {"visible", "not_visible", "delayed"} (approximate
                  numbers), or null when the queue does not exist
"""

import argparse
import base64
import json
import sys
import uuid

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

KEY = "ce-partitionkey"
PACKED = "weir.headers"
BODY_ENCODING = "weir.body-encoding"


def client(args):
    return boto3.client(
        "sqs",
        endpoint_url=args.endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=30),
    )


def missing(err):
    code = err.response.get("Error", {}).get("Code", "")
    return code in ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")


def queue_url(sqs, name):
    try:
        return sqs.get_queue_url(QueueName=name)["QueueUrl"]
    except ClientError as err:
        if missing(err):
            return None
        raise


def attribute(value):
    try:
        return {"DataType": "String", "StringValue": value.decode("utf-8")}
    except UnicodeDecodeError:
        return {"DataType": "Binary", "BinaryValue": value}


def create_queue(args):
    sqs = client(args)
    attributes = {"FifoQueue": "true"} if args.name.endswith(".fifo") else {}
    url = sqs.create_queue(QueueName=args.name, Attributes=attributes)["QueueUrl"]
    return {"url": url}


def produce(args):
    sqs = client(args)
    url = queue_url(sqs, args.name)
    if url is None:
        raise SystemExit(f"queue {args.name} does not exist")
    fifo = args.name.endswith(".fifo")
    records = [json.loads(line) for line in sys.stdin if line.strip()]
    out = []
    for start in range(0, len(records), 10):
        entries = []
        for index, record in enumerate(records[start:start + 10]):
            attributes = {}
            key = bytes.fromhex(record["key_hex"]) if record.get("key_hex") is not None else None
            if key is not None:
                attributes[KEY] = attribute(key)
            for name, value_hex in record.get("headers", []):
                if name in attributes:
                    raise SystemExit(f"header {name} twice (or with a key)")
                value = bytes.fromhex(value_hex)
                if not value:
                    raise SystemExit(f"header {name} is empty, which SQS refuses")
                attributes[name] = attribute(value)
            if len(attributes) > 10:
                raise SystemExit("more than 10 attributes, which SQS refuses")
            body = bytes.fromhex(record["value_hex"]).decode("utf-8")
            entry = {"Id": str(index), "MessageBody": body}
            if attributes:
                entry["MessageAttributes"] = attributes
            if fifo:
                entry["MessageGroupId"] = key.decode("utf-8") if key else "default"
                entry["MessageDeduplicationId"] = uuid.uuid4().hex
            entries.append(entry)
        answer = sqs.send_message_batch(QueueUrl=url, Entries=entries)
        if answer.get("Failed"):
            raise SystemExit(f"SQS refused some: {answer['Failed']}")
        ids = {ok["Id"]: ok["MessageId"] for ok in answer["Successful"]}
        for index in range(len(entries)):
            out.append({"queue_url": url, "message_id": ids[str(index)]})
        print(f"sent {len(out)} of {len(records)}", file=sys.stderr, flush=True)
    return out


def value_bytes(value):
    if value["DataType"].startswith("Binary"):
        return value.get("BinaryValue", b"")
    return value.get("StringValue", "").encode("utf-8")


def unpack(text):
    try:
        pairs = json.loads(text)
        out = []
        for name, value in pairs:
            if isinstance(value, str):
                out.append((name, value.encode("utf-8")))
            else:
                out.append((name, base64.b64decode(value["base64"], validate=True)))
        return out
    except (ValueError, TypeError, KeyError):
        return None


def read(args):
    sqs = client(args)
    url = queue_url(sqs, args.name)
    if url is None:
        return []
    # Nothing else consumes the queues this reads (Weir only sends to
    # them), so the visible count at the start is what the read must see.
    held = int(sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"],
    )["Attributes"].get("ApproximateNumberOfMessages", "0"))
    seen = {}
    order = []
    receipts = []
    idle = 0
    try:
        while len(order) < held and idle < 2:
            answer = sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10,
                VisibilityTimeout=args.visibility_timeout, WaitTimeSeconds=0,
                AttributeNames=["All"], MessageSystemAttributeNames=["All"],
                MessageAttributeNames=["All"])
            new = 0
            for message in answer.get("Messages", []):
                receipts.append(message["ReceiptHandle"])
                if message["MessageId"] not in seen:
                    order.append(message["MessageId"])
                    new += 1
                seen[message["MessageId"]] = message
            idle = 0 if new else idle + 1
            print(f"read {len(order)} of {held}", file=sys.stderr, flush=True)
    finally:
        for start in range(0, len(receipts), 10):
            sqs.change_message_visibility_batch(QueueUrl=url, Entries=[
                {"Id": str(i), "ReceiptHandle": r, "VisibilityTimeout": 0}
                for i, r in enumerate(receipts[start:start + 10])])
    out = []
    for message_id in order:
        message = seen[message_id]
        attributes = message.get("MessageAttributes", {})
        headers = []
        packed = []
        body = message.get("Body", "").encode("utf-8")
        for name in sorted(attributes):
            value = value_bytes(attributes[name])
            if name == PACKED:
                pairs = unpack(value)
                if pairs is not None:
                    packed = pairs
                    continue
            if name == BODY_ENCODING and value == b"base64":
                try:
                    body = base64.b64decode(body, validate=True)
                    continue
                except ValueError:
                    pass
            headers.append((name, value))
        headers.extend(packed)
        system = message.get("Attributes", {})
        group = system.get("MessageGroupId")
        key = next((v for n, v in headers if n == KEY), None)
        if group is not None and args.name.endswith(".fifo"):
            key = group.encode("utf-8")
        out.append({
            "queue_url": url,
            "message_id": message_id,
            "value_hex": body.hex(),
            "key_hex": key.hex() if key is not None else None,
            "headers": [[n, v.hex()] for n, v in headers],
            "group_id": group,
            "receive_count": int(system.get("ApproximateReceiveCount", "0")),
        })
    return out


def counts(args):
    sqs = client(args)
    url = queue_url(sqs, args.name)
    if url is None:
        return None
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
             "ApproximateNumberOfMessagesDelayed"]
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
    return {
        "visible": int(attributes.get(names[0], "0")),
        "not_visible": int(attributes.get(names[1], "0")),
        "delayed": int(attributes.get(names[2], "0")),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("create-queue", "produce", "read", "counts"):
        command = commands.add_parser(name)
        command.add_argument("--endpoint", required=True)
        command.add_argument("--name", required=True)
        if name == "read":
            command.add_argument("--visibility-timeout", type=int, default=900)
    args = parser.parse_args()
    run = {"create-queue": create_queue, "produce": produce, "read": read,
           "counts": counts}[args.command]
    json.dump(run(args), sys.stdout)


if __name__ == "__main__":
    main()
