"""An independent NATS JetStream client for Weir's integration tests (nats-py).

Tested with nats-py 2.16.0 (Python 3.11-3.13) against nats-server 2.9.

Subcommands print one JSON document on stdout:
  add-stream --url U --stream S --subjects a,b [--max-msgs N]
               creates stream S capturing the subjects (file storage; with
               --max-msgs, it refuses publishes once it holds N messages);
               if S exists already, leaves it as it is  -> stream summary
  delete-stream --url U --stream S  -> {"deleted": S}
  publish    --url U [--subject S]  (JSON lines on stdin:
               {"subject": str|null, "value_hex": str,
                "headers": [[name, value_str], ...], "msg_id": str|null,
                "header_block_hex": str|null};
               a null or absent subject means --subject; a header block
               replaces headers and msg_id and is sent byte for byte over
               the raw protocol, plain TCP only, as nats-py sends none that
               is not text lines)
               publishes through JetStream, one acknowledged publish at a
               time, in order  -> [[stream, seq], ...] from the PubAcks
  read       --url U (--stream S | --subject F) [--subject F] --max N --timeout-ms MS
               every message of the stream in sequence order (only those on
               subjects matching F, if given; without --stream, the stream
               that captures F), up to the last sequence the stream held when
               the read began; [] if no stream captures F. Fails when the
               server answers nothing for MS (a slow server makes the read
               longer, not short); a progress line on stderr per 500 messages
               -> [{"stream", "subject", "seq", "value_hex",
                    "headers": [[name, value_hex], ...], "time"}, ...]
  consumer   --url U (--stream S | --subject T) --durable D
               -> {"stream", "name", "num_pending", "num_ack_pending",
                   "num_redelivered", "num_waiting", "ack_floor_stream_seq",
                   "delivered_stream_seq", "filter_subject", "ack_wait_ns",
                   "max_ack_pending", "max_deliver"}, or null when the stream
                  or the consumer does not exist
  ack        --url U (--stream S | --subject T) --durable D --count N
               acts as a consumer: fetches up to N messages through durable
               pull consumer D (created if missing; explicit ack; filtered on
               T if given) and acknowledges each; stops early only once the
               consumer has nothing pending, however long a fetch takes
               -> [seq, ...]
  streams    --url U  -> [{"name", "subjects", "messages", "first_seq",
                           "last_seq", "consumers"}, ...]

Messages are read with the stream's message-get API (one request per
message), not through a consumer: nothing here creates consumer state on the
server, and header bytes are reported exactly as stored, in order, duplicates
included.
"""

import argparse
import asyncio
import base64
import json
import ssl
import sys
import time

import nats
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

# JetStream API error codes (nats-server's errors.json).
STREAM_NOT_FOUND = 10059
CONSUMER_NOT_FOUND = 10014
NO_MESSAGE_FOUND = 10037
STREAM_NAME_IN_USE = 10058


async def connect(args):
    """Connects once (a second try after 0.2 s); fails rather than waits for
    a server that is down."""
    errors = []

    async def remember(err):
        errors.append(err)

    tls = None
    if args.tls_ca:
        tls = ssl.create_default_context(cafile=args.tls_ca)
    try:
        return await asyncio.wait_for(
            nats.connect(args.url, connect_timeout=5, allow_reconnect=False,
                         max_reconnect_attempts=1, reconnect_time_wait=0.2,
                         error_cb=remember, tls=tls),
            timeout=15)
    except Exception as err:  # noqa: BLE001 - reported, with what the client saw
        seen = "; ".join(str(e) for e in errors[-2:]) or repr(err)
        raise SystemExit(f"cannot connect to {args.url}: {seen}") from None


async def api(nc, subject, request=None, timeout=10):
    """One JetStream API request; returns the decoded response, errors included."""
    payload = b"" if request is None else json.dumps(request).encode()
    reply = await nc.request("$JS.API." + subject, payload, timeout=timeout)
    return json.loads(reply.data)


def api_error(response):
    error = response.get("error")
    return None if error is None else (error.get("err_code"), error.get("description"))


async def stream_for(nc, subject):
    """The stream that captures `subject`, or None."""
    response = await api(nc, "STREAM.NAMES", {"subject": subject})
    if api_error(response):
        raise SystemExit(f"cannot look up the stream of {subject}: {response['error']}")
    names = response.get("streams") or []
    return names[0] if names else None


def summary(info):
    state = info.get("state") or {}
    config = info.get("config") or {}
    return {
        "name": config.get("name"),
        "subjects": config.get("subjects") or [],
        "messages": state.get("messages", 0),
        "first_seq": state.get("first_seq", 0),
        "last_seq": state.get("last_seq", 0),
        "consumers": state.get("consumer_count", 0),
    }


async def add_stream(nc, args):
    subjects = [s for s in args.subjects.split(",") if s]
    js = nc.jetstream()
    try:
        # --max-msgs N: a stream that refuses publishes once it holds N
        # messages (discard "new"), as a full stream does.
        limits = {}
        if args.max_msgs >= 0:
            limits = {"max_msgs": args.max_msgs, "discard": DiscardPolicy.NEW}
        await js.add_stream(StreamConfig(name=args.stream, subjects=subjects,
                                         storage=StorageType.FILE, **limits))
    except nats.js.errors.BadRequestError as err:
        if err.err_code != STREAM_NAME_IN_USE:
            raise
    info = await api(nc, f"STREAM.INFO.{args.stream}")
    if api_error(info):
        raise SystemExit(f"stream {args.stream}: {info['error']}")
    return summary(info)


async def delete_stream(nc, args):
    response = await api(nc, f"STREAM.DELETE.{args.stream}")
    if api_error(response):
        raise SystemExit(f"stream {args.stream}: {response['error']}")
    return {"deleted": args.stream}


def parse_headers(raw):
    """NATS header block bytes -> [[name, value_hex], ...] in order."""
    if not raw:
        return []
    lines = raw.split(b"\r\n")
    # The first line is the version ("NATS/1.0", maybe with a status).
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        headers.append([name.decode("utf-8", "replace"), value.strip().hex()])
    return headers


async def publish(nc, args):
    js = nc.jetstream(timeout=30)
    acks = []
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        record = json.loads(line)
        subject = record.get("subject") or args.subject
        if not subject:
            raise SystemExit(f"no subject for {line} (give --subject or \"subject\")")
        if record.get("header_block_hex") is not None:
            acks.append(await raw_publish(args.url, subject,
                                          bytes.fromhex(record["header_block_hex"]),
                                          bytes.fromhex(record["value_hex"])))
            continue
        headers = {}
        for name, value in record.get("headers") or []:
            if name in headers:
                raise SystemExit(f"header {name!r} given twice: nats-py sends one value a name")
            headers[name] = value
        if record.get("msg_id") is not None:
            headers["Nats-Msg-Id"] = record["msg_id"]
        try:
            ack = await js.publish(subject, bytes.fromhex(record["value_hex"]),
                                   headers=headers or None)
        except nats.js.errors.NoStreamResponseError:
            raise SystemExit(f"no stream captures subject {subject!r}: create one first (add-stream)")
        acks.append([ack.stream, ack.seq])
    return acks


async def raw_publish(url, subject, block, payload):
    """HPUB of `block` and `payload` to `subject` on a connection of our own;
    waits for the JetStream PubAck -> [stream, seq]."""
    first = url.split(",")[0].strip()
    if not first.startswith("nats://"):
        raise SystemExit(f"a raw header block needs a plain nats:// URL, not {first!r}")
    host, _, port = first[len("nats://"):].rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        await asyncio.wait_for(reader.readline(), 10)  # INFO
        inbox = f"_INBOX.rawpub.{time.time_ns()}"
        writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"protocol":1}\r\n')
        writer.write(f"SUB {inbox} 1\r\n".encode())
        writer.write(f"HPUB {subject} {inbox} {len(block)} {len(block) + len(payload)}\r\n".encode()
                     + block + payload + b"\r\n")
        await writer.drain()
        while True:
            line = await asyncio.wait_for(reader.readline(), 30)
            if not line:
                raise SystemExit("the server closed the raw connection")
            if line.startswith(b"PING"):
                writer.write(b"PONG\r\n")
                await writer.drain()
            elif line.startswith(b"-ERR"):
                raise SystemExit(f"the server refused a raw publish: {line!r}")
            elif line.startswith(b"MSG "):
                size = int(line.split()[-1])
                data = await asyncio.wait_for(reader.readexactly(size + 2), 30)
                ack = json.loads(data[:size])
                if "error" in ack:
                    raise SystemExit(f"the raw publish was refused: {ack['error']}")
                return [ack["stream"], ack["seq"]]
    finally:
        writer.close()


async def read(nc, args):
    stream = args.stream or await stream_for(nc, args.subject)
    if stream is None:
        return []
    info = await api(nc, f"STREAM.INFO.{stream}")
    if api_error(info):
        if api_error(info)[0] == STREAM_NOT_FOUND:
            return []
        raise SystemExit(f"stream {stream}: {info['error']}")
    last = (info.get("state") or {}).get("last_seq", 0)
    stall = args.timeout_ms / 1000
    messages = []
    seq = 1
    while seq <= last and len(messages) < args.max:
        request = {"seq": seq}
        if args.subject:
            request["next_by_subj"] = args.subject
        try:
            response = await api(nc, f"STREAM.MSG.GET.{stream}", request, timeout=stall)
        except nats.errors.TimeoutError:
            raise SystemExit(f"read {stream}: no answer for {stall} s at seq {seq} of {last}")
        error = api_error(response)
        if error and error[0] == NO_MESSAGE_FOUND:
            if not args.subject:
                # A deleted message: go on with the next sequence.
                seq += 1
                continue
            break
        if error:
            raise SystemExit(f"read {stream} at seq {seq}: {response['error']}")
        message = response["message"]
        raw_headers = base64.b64decode(message.get("hdrs") or "")
        data = base64.b64decode(message.get("data") or "")
        messages.append({
            "stream": stream,
            "subject": message["subject"],
            "seq": message["seq"],
            "value_hex": data.hex(),
            "headers": parse_headers(raw_headers),
            "time": message.get("time"),
        })
        seq = message["seq"] + 1
        if len(messages) % 500 == 0:
            print(f"read {stream}: {len(messages)} messages, at seq {seq - 1} of {last}",
                  file=sys.stderr, flush=True)
    return messages


async def consumer(nc, args):
    stream = args.stream or await stream_for(nc, args.subject)
    if stream is None:
        return None
    info = await api(nc, f"CONSUMER.INFO.{stream}.{args.durable}")
    error = api_error(info)
    if error and error[0] in (STREAM_NOT_FOUND, CONSUMER_NOT_FOUND):
        return None
    if error:
        raise SystemExit(f"consumer {args.durable} on {stream}: {info['error']}")
    config = info.get("config") or {}
    return {
        "stream": stream,
        "name": info.get("name"),
        "num_pending": info.get("num_pending", 0),
        "num_ack_pending": info.get("num_ack_pending", 0),
        "num_redelivered": info.get("num_redelivered", 0),
        "num_waiting": info.get("num_waiting", 0),
        "ack_floor_stream_seq": (info.get("ack_floor") or {}).get("stream_seq", 0),
        "delivered_stream_seq": (info.get("delivered") or {}).get("stream_seq", 0),
        "filter_subject": config.get("filter_subject"),
        "ack_wait_ns": config.get("ack_wait"),
        "max_ack_pending": config.get("max_ack_pending"),
        "max_deliver": config.get("max_deliver"),
    }


async def ack(nc, args):
    """Acts as a consumer: fetches up to --count messages through durable pull
    consumer --durable (created if missing: explicit ack, deliver all, filter
    --subject) and acknowledges them."""
    stream = args.stream or await stream_for(nc, args.subject)
    if stream is None:
        raise SystemExit(f"no stream captures subject {args.subject!r}")
    js = nc.jetstream()
    subscription = await js.pull_subscribe(args.subject or ">", durable=args.durable,
                                           stream=stream)
    acked = []
    while len(acked) < args.count:
        # Stop early only when the consumer has nothing left to deliver,
        # never because a fetch took long on a slow server.
        info = await subscription.consumer_info()
        if info.num_pending == 0:
            break
        wanted = min(args.count - len(acked), info.num_pending)
        try:
            batch = await subscription.fetch(wanted, timeout=10)
        except nats.errors.TimeoutError:
            print(f"ack {args.durable}: {len(acked)} acknowledged, {info.num_pending} pending",
                  file=sys.stderr, flush=True)
            continue
        for message in batch:
            await message.ack_sync()
            acked.append(message.metadata.sequence.stream)
    return acked


async def streams(nc, _args):
    result = []
    offset = 0
    while True:
        response = await api(nc, "STREAM.LIST", {"offset": offset})
        if api_error(response):
            raise SystemExit(f"cannot list streams: {response['error']}")
        page = response.get("streams") or []
        result.extend(summary(info) for info in page)
        offset += len(page)
        if not page or offset >= response.get("total", 0):
            return sorted(result, key=lambda s: s["name"] or "")


COMMANDS = {
    "add-stream": add_stream,
    "publish": publish,
    "read": read,
    "consumer": consumer,
    "ack": ack,
    "streams": streams,
    "delete-stream": delete_stream,
}


async def run(args):
    nc = await connect(args)
    try:
        return await COMMANDS[args.command](nc, args)
    finally:
        await nc.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        p = sub.add_parser(name)
        p.add_argument("--url", required=True)
        p.add_argument("--tls-ca", help="speak TLS, trusting this CA (PEM)")
        if name == "add-stream":
            p.add_argument("--stream", required=True)
            p.add_argument("--subjects", required=True)
            p.add_argument("--max-msgs", type=int, default=-1)
        if name == "delete-stream":
            p.add_argument("--stream", required=True)
        if name == "publish":
            p.add_argument("--subject")
        if name in ("read", "consumer", "ack"):
            p.add_argument("--stream")
            p.add_argument("--subject")
        if name == "read":
            p.add_argument("--max", type=int, default=1_000_000)
            p.add_argument("--timeout-ms", type=int, default=30_000)
        if name in ("consumer", "ack"):
            p.add_argument("--durable", required=True)
        if name == "ack":
            p.add_argument("--count", type=int, required=True)
    args = parser.parse_args()
    if args.command in ("read", "consumer", "ack") and not (args.stream or args.subject):
        parser.error(f"{args.command} needs --stream or --subject")
    json.dump(asyncio.run(run(args)), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
