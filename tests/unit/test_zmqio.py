"""zmqio's conversion of waits for zmq_poll."""

import zmq

from inferd import zmqio


def test_a_wait_under_a_millisecond_is_not_truncated_to_a_poll_that_returns_at_once():
    assert zmqio.poll_ms(0.0004) == 1
    assert zmqio.poll_ms(0.0011) == 2
    assert zmqio.poll_ms(0.0) == 0
    assert zmqio.poll_ms(-0.5) == 0
    assert zmqio.poll_ms(None) == -1


def test_readable_waits_for_a_sub_millisecond_timeout_instead_of_spinning():
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://zmqio-readable")
        b.connect("inproc://zmqio-readable")
        assert not zmqio.readable(b, 0.0005)
        a.send(b"x")
        assert zmqio.readable(b, 0.0005)
        assert zmqio.recv(b) == [b"x"]
    finally:
        a.close(0)
        b.close(0)
