"""An independent Redis Streams client for Weir's integration tests (redis-py).

Tested with redis-py 5.2.1 (Python 3.11-3.13) against redis-server 7.0.

Subcommands print one JSON document on stdout:
  xadd   --url U --stream S   (JSON lines on stdin: {"key_hex": str|null,
             "value_hex": str, "headers": [[name, value_hex], ...]})
             appends one entry per line, in order, with fields `key` (when
             given), `payload`, then one per header (a name "hex:<hex>" is
             those raw bytes, which need not be UTF-8)  -> [entry_id, ...]
  read   --url U --stream S
             every entry of the stream in order (XRANGE), [] if none
             -> [{"id", "fields": [[name_hex, value_hex], ...]}, ...]
  group  --url U --stream S --group G
             the group's state (XINFO GROUPS), or null when the stream or
             the group does not exist
             -> {"name", "consumers", "pending", "last_delivered_id",
                 "entries_read", "lag"}
"""

import argparse
import json
import sys

import redis


def cmd_xadd(r, args):
    ids = []
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        record = json.loads(line)
        fields = []
        if record.get("key_hex") is not None:
            fields.append((b"key", bytes.fromhex(record["key_hex"])))
        fields.append((b"payload", bytes.fromhex(record["value_hex"])))
        for name, value_hex in record.get("headers", []):
            raw = bytes.fromhex(name[4:]) if name.startswith("hex:") else name.encode()
            fields.append((raw, bytes.fromhex(value_hex)))
        # redis-py takes a dict; build the command by hand to keep the order
        # and repeated names.
        flat = []
        for name, value in fields:
            flat += [name, value]
        entry_id = r.execute_command("XADD", args.stream, "*", *flat)
        ids.append(entry_id.decode())
    return ids


def cmd_read(r, args):
    # The raw reply keeps every field in order (redis-py's own parsing makes
    # a dict of them).
    r.response_callbacks.pop("XRANGE", None)
    out = []
    last = "-"
    while True:
        page = r.execute_command("XRANGE", args.stream, last, "+", "COUNT", 1000)
        for entry_id, flat in page:
            fields = []
            flat = flat or []
            for i in range(0, len(flat), 2):
                fields.append([flat[i].hex(), flat[i + 1].hex()])
            out.append({"id": entry_id.decode(), "fields": fields})
        if len(page) < 1000:
            return out
        last = "(" + page[-1][0].decode()


def cmd_group(r, args):
    try:
        groups = r.xinfo_groups(args.stream)
    except redis.ResponseError:
        return None
    for g in groups:
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name != args.group:
            continue
        last = g.get("last-delivered-id")
        return {
            "name": name,
            "consumers": g.get("consumers"),
            "pending": g.get("pending"),
            "last_delivered_id": last.decode() if isinstance(last, bytes) else last,
            "entries_read": g.get("entries-read"),
            "lag": g.get("lag"),
        }
    return None


COMMANDS = {"xadd": cmd_xadd, "read": cmd_read, "group": cmd_group}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        p = sub.add_parser(name)
        p.add_argument("--url", required=True)
        p.add_argument("--stream", required=True)
        if name == "group":
            p.add_argument("--group", required=True)
    args = parser.parse_args()
    r = redis.Redis.from_url(args.url, socket_timeout=30)
    json.dump(COMMANDS[args.command](r, args), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
