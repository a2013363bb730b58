"""Batching limits, duplicate ids, linger and retries (time injected); backoff formulas."""

from __future__ import annotations

import random
import threading
import time

from hypothesis import given, settings, strategies as st

from cloudtrail_sink import events
from cloudtrail_sink.backoff import FullJitter, Pause
from cloudtrail_sink.batcher import Batcher, Item

from sinksupport import ACCOUNT, event


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def item(i, pad=0, **extra):
    built = events.build({"eventData": event(i, pad=pad, **extra)}, ACCOUNT)
    assert isinstance(built, events.Prepared)
    return Item(None, built, "t", 1.0)


def drain(b: Batcher) -> list[list[Item]]:
    b.flush()
    out = []
    while b.count():
        out.append(b.take(timeout=0))
    return out


def test_never_more_than_max_events():
    b = Batcher(max_events=100, max_bytes=999_000, linger=0.2, clock=FakeClock())
    for i in range(250):
        b.add(item(i))
    batch = b.take(timeout=0)  # full: handed out without waiting for the linger
    assert len(batch) == 100
    assert [len(x) for x in drain(b)] == [100, 50]


def test_never_more_than_the_request_size_budget():
    budget = 50_000
    b = Batcher(max_events=100, max_bytes=budget, linger=0.2, clock=FakeClock())
    for i in range(60):
        b.add(item(i, pad=4_000))
    batches = drain(b)
    assert sum(len(x) for x in batches) == 60
    for batch in batches:
        size = events.request_size([it.p.size for it in batch])
        assert size <= budget
    # ...and full: the next event would not have fitted.
    assert events.request_size([it.p.size for it in batches[0]] + [batches[1][0].p.size]) > budget


def test_duplicate_ids_never_share_a_request():
    b = Batcher(max_events=100, max_bytes=999_000, linger=0.2, clock=FakeClock())
    first, twin, other = item(1), item(1), item(1, eventName="Different")
    assert first.p.id == twin.p.id == other.p.id and first.p.text == twin.p.text != other.p.text
    for it in (first, item(2), twin, other, item(3)):
        b.add(it)
    batches = drain(b)
    ids = [[it.p.id for it in batch] for batch in batches]
    assert all(len(set(x)) == len(x) for x in ids)
    assert ids == [["evt-1", "evt-2", "evt-3"], ["evt-1"]]
    # The identical twin is sent once, riding along with the first copy.
    assert batches[0][0] is first and first.aliases == [twin] and batches[1][0] is other


def test_linger_hands_out_a_partial_batch_only_when_due():
    clock = FakeClock()
    b = Batcher(max_events=100, max_bytes=999_000, linger=0.2, clock=clock)
    b.add(item(1))
    assert b.take(timeout=0) is None
    clock.t += 0.19
    assert b.take(timeout=0) is None
    clock.t += 0.02
    assert [it.p.id for it in b.take(timeout=0)] == ["evt-1"]


def test_a_jittered_linger_is_drawn_again_for_every_batch():
    # With pacing on the sink jitters the linger (pacing.LINGER_JITTER): each batch waits
    # linger * (1 + J * (2u - 1)) for its own draw u, so calls fed on a fixed cadence change phase.
    clock = FakeClock()
    b = Batcher(linger=0.2, clock=clock, linger_jitter=0.5, rand=SeqRandom([0.0, 1.0, 0.5]))
    waited = []
    for i in range(2):
        start = clock.t
        b.add(item(i))
        while (batch := b.take(timeout=0)) is None:
            clock.t = round(clock.t + 0.01, 2)
        assert [it.p.id for it in batch] == [f"evt-{i}"]
        waited.append(round(clock.t - start, 2))
    assert waited == [0.1, 0.3]  # 0.2 x 0.5, then 0.2 x 1.5


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), jitter=st.sampled_from([0.0, 0.25, 0.5, 1.0]))
def test_every_partial_batch_waits_within_the_jittered_linger_and_retries_stay_due(seed, jitter):
    clock = FakeClock()
    b = Batcher(linger=0.2, clock=clock, linger_jitter=jitter, rand=random.Random(seed))
    waited = []
    for i in range(30):
        start = clock.t
        b.add(item(i))
        while (batch := b.take(timeout=0)) is None:
            clock.t += 0.005
        waited.append(clock.t - start)
        assert len(batch) == 1
    assert all(0.2 * (1 - jitter) - 1e-9 <= w <= 0.2 * (1 + jitter) + 0.005 + 1e-9
               for w in waited)
    if jitter:
        assert max(waited) - min(waited) > 0.2 * jitter / 2  # the draws differ
    # A retry whose delay is over goes at once, whatever the current draw.
    b.retry([item("r")], 1.0)
    clock.t += 1.0
    assert [it.p.id for it in b.take(timeout=0)] == ["evt-r"]


class ClockedCondition(threading.Condition):
    """A Condition whose ``wait`` lets the fake clock run for the timeout instead of sleeping, so
    a blocking ``take`` shows when it would have woken up."""

    def __init__(self, clock: FakeClock):
        super().__init__()
        self.clock = clock
        self.waits: list[float] = []

    def wait(self, timeout=None):
        assert timeout is not None, "a taker with a batch pending must not sleep for ever"
        self.waits.append(timeout)
        self.clock.t += timeout
        return False


def test_a_waiting_taker_wakes_when_the_drawn_linger_ends():
    # A blocked take sleeps until this batch's drawn linger is over, not the nominal one: a
    # shorter draw must not leave a due batch waiting, a longer one must not wake it early.
    clock = FakeClock()
    b = Batcher(linger=0.2, clock=clock, linger_jitter=0.5, rand=SeqRandom([0.0, 1.0, 0.5]))
    b._cond = ClockedCondition(clock)
    for i, drawn in enumerate((0.1, 0.3)):
        start = clock.t
        b.add(item(i))
        assert [it.p.id for it in b.take(timeout=5.0)] == [f"evt-{i}"]
        assert abs(clock.t - start - drawn) < 1e-9
    assert len(b._cond.waits) == 2  # one wait per batch: it never polls


class CountedCondition(threading.Condition):
    """A Condition that really blocks (the fake clock stands still, so no linger ever ends) and
    tells the test each time a taker has gone to sleep in it."""

    def __init__(self):
        super().__init__()
        self.asleep = threading.Semaphore(0)

    def wait(self, timeout=None):
        # Released with the lock still held: once the test holds the lock in turn, this taker
        # is registered as a waiter, so a notify reaches it.
        self.asleep.release()
        return super().wait(timeout)


def test_a_burst_wakes_one_sender_per_full_batch():
    # The sink runs up to --max-in-flight senders blocked in take(). A burst that fills several
    # batches at once arrives in ONE add_many, which wakes one taker: each taker that gets a
    # batch must wake the next, so the full batches go out side by side, not one per wake-up.
    takers, max_events = 3, 10
    b = Batcher(max_events=max_events, linger=0.2, clock=FakeClock())
    b._cond = CountedCondition()
    got: list[list[Item] | None] = [None] * takers
    errors: list[BaseException] = []

    def taker(n):
        try:
            got[n] = b.take()
        except BaseException as e:  # reported below, by the test thread
            errors.append(e)

    threads = [threading.Thread(target=taker, args=(n,), daemon=True) for n in range(takers)]
    try:
        for t in threads:
            t.start()
        # Every taker asleep before the burst: one arriving later would find a batch by itself
        # and hide a missing wake-up. (The timeouts here are hang guards, not speed figures.)
        for _ in range(takers):
            assert b._cond.asleep.acquire(timeout=5), "a taker never went to sleep"
        burst = [item(i) for i in range(takers * max_events)]
        b.add_many(burst)
        give_up = time.monotonic() + 5  # a taker nobody woke would sleep until close()
        for t in threads:
            t.join(timeout=max(0.0, give_up - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "a full batch waited with a taker idle"
    finally:
        b.close()
        for t in threads:
            t.join(timeout=10)
    assert not errors, errors
    assert [len(batch) for batch in got] == [max_events] * takers
    assert sorted(id(it) for batch in got for it in batch) == sorted(map(id, burst))
    assert b.count() == 0


def test_retries_left_over_from_a_full_batch_do_not_wait_for_the_next_draw():
    # Three retries due at once, two events a batch: the third is due as well, whatever linger
    # the batch formed before it drew (here 0.3 s, after a 0.1 s draw).
    clock = FakeClock()
    b = Batcher(max_events=2, linger=0.2, clock=clock, linger_jitter=0.5,
                rand=SeqRandom([0.0, 1.0, 0.5]))
    b.retry([item(1), item(2), item(3)], 1.0)
    clock.t += 1.0
    assert len(b.take(timeout=0)) == 2
    assert len(b.take(timeout=0)) == 1


def test_retries_wait_their_delay_then_go_first():
    clock = FakeClock()
    b = Batcher(max_events=100, max_bytes=999_000, linger=0.2, clock=clock)
    r = item("r")
    b.retry([r], 1.0)
    clock.t += 0.5
    b.add(item("new"))
    clock.t += 0.3  # new is due, the retry is not yet
    assert [it.p.id for it in b.take(timeout=0)] == ["evt-new"]
    clock.t += 0.3
    assert [it.p.id for it in b.take(timeout=0)] == ["evt-r"]


def test_retries_due_together_go_in_the_order_they_came_due_before_newer_events():
    clock = FakeClock()
    b = Batcher(max_events=100, max_bytes=999_000, linger=0.2, clock=clock)
    b.add(item("new"))
    b.retry([item("c")], 0.3)
    b.retry([item("a")], 0.1)
    b.retry([item("b")], 0.2)
    clock.t += 0.5
    assert [it.p.id for it in b.take(timeout=0)] == ["evt-a", "evt-b", "evt-c", "evt-new"]


def test_requeued_batches_keep_their_shape():
    b = Batcher(max_events=100, max_bytes=999_000, linger=0.2, clock=FakeClock())
    half = [item(1), item(2)]
    b.requeue_batch(half)
    b.add(item(3))
    assert b.take(timeout=0) is half


def test_close_releases_waiting_takers():
    b = Batcher(linger=10, clock=FakeClock())
    b.close()
    assert b.take() is None


class SeqRandom(random.Random):
    def __init__(self, values):
        super().__init__(0)
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


def test_full_jitter_formula():
    j = FullJitter(base=0.1, cap=20.0, rand=SeqRandom([1.0, 0.5, 1.0, 0.25]))
    assert j.delay(0) == 0.1
    assert j.delay(3) == 0.5 * 0.8
    assert j.delay(20) == 20.0  # capped
    assert j.delay(1) == 0.25 * 0.2


def test_pause_doubles_up_to_its_cap_and_clears_on_success():
    clock = FakeClock()
    p = Pause(base=1.0, cap=8.0, clock=clock, rand=SeqRandom([1.0] * 6))
    lengths = []
    for _ in range(5):
        lengths.append(p.fail("ChannelNotFound"))
        # Requests in flight when the pause began fail too: they must not double it again.
        assert p.fail("ChannelNotFound") is None
        clock.t += lengths[-1]
    assert lengths == [1.0, 2.0, 4.0, 8.0, 8.0]
    clock.t -= 8.0
    assert p.paused and p.remaining() == 8.0 and p.reason == "ChannelNotFound"
    clock.t += 8.0
    assert p.remaining() == 0 and p.paused  # still paused until a request succeeds
    p.succeed()
    assert not p.paused and p.fail("x") == 1.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 3), st.integers(0, 27_000)),
                min_size=1, max_size=300),
       st.integers(1, 100), st.integers(40_000, 200_000))
def test_every_batch_respects_the_limits_and_every_event_goes_exactly_once(
        specs, max_events, max_bytes):
    b = Batcher(max_events=max_events, max_bytes=max_bytes, linger=0.2, clock=FakeClock())
    added = []
    for uid, variant, pad in specs:  # same uid + variant: identical; other variant: differs
        it = item(uid, pad=pad, eventName=f"v{variant}")
        added.append(it)
        b.add(it)
    settled = []
    for batch in drain(b):
        ids = [it.p.id for it in batch]
        assert 1 <= len(batch) <= max_events and len(ids) == len(set(ids))
        assert events.request_size([it.p.size for it in batch]) <= max_bytes
        for it in batch:
            settled.extend(it.all())
    assert sorted(map(id, settled)) == sorted(map(id, added))
