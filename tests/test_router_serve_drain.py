"""`dspark serve router` on SIGTERM: it waits for its replicas to answer no request before Serve shuts its proxies
(and their clients' connections) down, at most --drain seconds."""

from __future__ import annotations

from dspark.router.serve import _drain


class _Calls:
    """A stand-in for a Serve deployment handle: handle.in_flight.remote().result() answers the next count."""

    def __init__(self, counts):
        self.counts, self.asked = list(counts), 0
        self.in_flight = self

    def remote(self):
        return self

    def result(self, timeout_s=None):
        self.asked += 1
        value = self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]
        if isinstance(value, BaseException):
            raise value
        return value


def test_drain_waits_until_several_polls_in_a_row_see_no_request():
    h = _Calls([2, 1, 0, 3, 0, 0, 0])  # a 0 from one replica while another is busy does not end it
    assert _drain(h, seconds=10, poll_s=0.0, flush_s=0.0) is True
    assert h.asked == 7


def test_drain_gives_up_when_its_time_is_up():
    h = _Calls([1])
    assert _drain(h, seconds=0.3, poll_s=0.05, flush_s=0.0) is False
    assert h.asked >= 3


def test_a_replica_that_cannot_answer_is_not_waited_for():
    h = _Calls([RuntimeError("replica gone"), 0, 0])
    assert _drain(h, seconds=5, poll_s=0.0, flush_s=0.0) is True
