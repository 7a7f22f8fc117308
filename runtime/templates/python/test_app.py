"""Unit tests that run in plain Python: `python -m unittest`."""

import unittest

import weir
import weir.testing

import app  # noqa: F401 - registers the handler


class HandlerTest(unittest.TestCase):
    def setUp(self) -> None:
        weir.testing.reset(config={"greeting": "hi"})

    def test_counts_messages_per_key(self) -> None:
        event = weir.Event(b'{"text": "there"}', key="k")
        weir.run(event)
        weir.run(event)
        self.assertEqual(weir.testing.state()["seen/k"], b'{"count":2}')

    def test_malformed_json_is_permanent(self) -> None:
        with self.assertRaises(weir.Permanent) as raised:
            weir.run(weir.Event(b"not json"))
        self.assertEqual(raised.exception.category, weir.Category.VALIDATION)


if __name__ == "__main__":
    unittest.main()
