"""moto's SQS-API server (`moto_server`) for Weir's integration tests, with
a cheaper clock and retention check on its receive path, same answers.

Tested with moto 5.0.28. Usage: python sqs_server.py -H HOST -p PORT (the
arguments of `moto_server`).

moto 5.0 reads the clock through `unix_time()`, which builds two datetime
objects per call, and calls it twice per queued message for every message
it hands out: `ReceiveMessage` checks each returned message's retention by
computing all the queue's attributes, approximate counts included, which
scans the whole queue three times. A receive of ten messages from a queue
of 2,000 takes about two seconds (reading the whole queue, six minutes on
a busy 2-core machine), and the SQS tests spent their time inside moto
rather than inside Weir. Here the clock is `time.time()` (the same
number: seconds since the epoch) and the retention check reads the queue's
retention period directly (the same rule: a message is served until its
retention period has passed since it was sent). Nothing else changes;
should moto move these names, this fails at start instead of serving a
different server.
"""

import sys
import time

import moto.core.utils
import moto.sqs.models as models
from moto.server import main

EXPECTED = ("unix_time", "unix_time_millis")


def unix_time(dt=None):
    """Seconds since the epoch, as `moto.core.utils.unix_time`."""
    if dt is None:
        return time.time()
    return moto.core.utils.unix_time(dt)


def unix_time_millis(dt=None):
    """Milliseconds since the epoch, as `moto.core.utils.unix_time_millis`."""
    return unix_time(dt) * 1000.0


def retained(self, queue_name, message):
    """Whether `message` is inside its queue's retention period, as
    `SQSBackend.is_message_valid_based_on_retention_period`."""
    queue = self.get_queue(queue_name)
    retain_until = int(queue.message_retention_period) + message.sent_timestamp / 1000
    return retain_until > unix_time()


def patch():
    for name in EXPECTED:
        if not callable(getattr(models, name, None)):
            raise SystemExit(f"moto.sqs.models.{name} is gone: this moto is not the one tested")
    backend = models.SQSBackend
    if not callable(getattr(backend, "is_message_valid_based_on_retention_period", None)):
        raise SystemExit("SQSBackend.is_message_valid_based_on_retention_period is gone: "
                         "this moto is not the one tested")
    models.unix_time = unix_time
    models.unix_time_millis = unix_time_millis
    backend.is_message_valid_based_on_retention_period = retained


if __name__ == "__main__":
    patch()
    main(sys.argv[1:])
