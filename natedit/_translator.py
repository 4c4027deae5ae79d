"""PLACEHOLDER: being written. Public API contract (stable):

class Translator:
    def __init__(self, policy: Policy, *, rng: random.Random | None = None) -> None
        # policy.public_address must be set (resolve it at the edge).
    policy: Policy            # current policy (reload replaces it via set_policy)
    stats: Stats              # counters, read by metrics
    def handle_packet(self, data: bytes, direction: Direction, now: float) -> Verdict
    def next_deadline(self) -> float | None
    def handle_timer(self, now: float) -> list[Event]
    def calls(self) -> list[CallInfo]
"""
