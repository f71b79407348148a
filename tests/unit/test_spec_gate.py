"""spec_decode/gate.py on a simulated clock: the gate measures both arms, settles on the faster
one per batch-size bucket, re-measures the other now and then, follows a change, and ignores
idle gaps and the mixed interval after a switch."""
from __future__ import annotations

from servelm.spec_decode.gate import SpeculationGate


class Sim:
    """Steps of fixed cost and yield per arm: cost[arm] seconds, tokens[arm] per step."""

    def __init__(self, cost: dict, tokens: dict) -> None:
        self.t = 0.0
        self.cost, self.tokens = cost, tokens
        self.gate = SpeculationGate(clock=lambda: self.t, explore_every=50, explore_steps=4)

    def run(self, steps: int, batch: int) -> list[bool]:
        arms, arm = [], True
        for _ in range(steps):
            self.t += self.cost[arm]
            self.gate.observe(batch, arm, self.tokens[arm])
            arms.append(arm)
            arm = self.gate.choose(batch)
        return arms


def test_settles_on_the_faster_arm_and_explores_rarely():
    # speculation: 3 tokens in 12 ms (250/s); plain: 1 token in 6 ms (167/s)
    sim = Sim({True: 0.012, False: 0.006}, {True: 3.0, False: 1.0})
    arms = sim.run(600, batch=1)
    late = arms[100:]
    assert sum(late) / len(late) > 0.9  # mostly drafting
    assert 0 < len(late) - sum(late) <= 0.1 * len(late)  # the plain arm re-measured, rarely
    # at a large batch speculation loses: 4 * 64 tokens in 0.1 s vs 64 in 0.02 s
    sim.cost, sim.tokens = {True: 0.1, False: 0.02}, {True: 256.0, False: 64.0}
    late = sim.run(600, batch=64)[100:]
    assert sum(late) / len(late) < 0.1
    # the small-batch bucket kept its own verdict
    small = sim.gate.buckets[SpeculationGate._key(1)].arms
    assert small[True].tok_s() > small[False].tok_s()


def test_follows_a_change_of_acceptance():
    sim = Sim({True: 0.012, False: 0.006}, {True: 3.0, False: 1.0})
    sim.run(300, batch=2)
    sim.tokens[True] = 1.2  # acceptance collapsed: 100 tok/s vs 167 plain
    late = sim.run(400, batch=2)[150:]
    assert sum(late) / len(late) < 0.1


def test_idle_gaps_and_switch_intervals_are_not_measured():
    t = [0.0]
    g = SpeculationGate(clock=lambda: t[0])
    for _ in range(5):
        t[0] += 0.01
        g.observe(1, False, 1)
    arm = g.buckets[1].arms[False]
    # the first had no predecessor, the second was the arm's first (first-use costs)
    assert arm.n == 3 and abs(arm.seconds - 0.01) < 1e-9
    t[0] += 30.0  # idle
    g.observe(1, False, 1)
    assert arm.n == 3
    t[0] += 0.5  # a switch: the interval mixes both arms
    g.observe(1, True, 3)
    assert g.buckets[1].arms[True].n == 0
    g.interrupt()  # a prompt-only step: the next interval is not a decode step's
    t[0] += 0.2
    g.observe(1, True, 3)
    assert g.buckets[1].arms[True].n == 0
