"""What was measured of one request: the unit every other bench module works on."""

from dataclasses import asdict, dataclass, field


@dataclass
class RequestRecord:
    """One request as the client saw it. Times are seconds; ``sent_s`` is from the
    start of the run, the others from the moment the request was sent.

    ``chunk_times_s`` holds the arrival time of every streamed chunk that carried
    output (text, or the end of the choice), so TTFT is its first entry and ITL
    its gaps. A failed request has ``error`` and, if it was sent, ``e2e_s`` up to
    its failure: it ran that long, so the run's duration and in-flight counts
    include it (only a turn not sent because an earlier one failed has none).
    """

    index: int  # position in the run's schedule
    conversation: int = 0
    turn: int = 0
    scheduled_s: float = 0.0  # when the arrival schedule wanted it sent
    sent_s: float = 0.0
    e2e_s: float | None = None  # send to the response's last byte, or to its failure
    chunk_times_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0  # as the server's usage reports them, else as planned
    output_tokens: int = 0
    planned_prompt_tokens: int = 0
    planned_output_tokens: int = 0
    usage_reported: bool = False
    cached_tokens: int = 0  # of the prompt, from a prefix cache (the usage's details)
    error: str | None = None
    output_text: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2e_s is not None and bool(self.chunk_times_s)

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times_s[0] if self.chunk_times_s else None

    @property
    def finished_s(self) -> float | None:
        """End of the request (completed or failed), from the start of the run."""
        return None if self.e2e_s is None else self.sent_s + self.e2e_s

    def to_json(self, keep_text: bool = False) -> dict:
        data = asdict(self)
        data["chunk_times_s"] = [round(t, 6) for t in self.chunk_times_s]
        if not keep_text:
            data.pop("output_text")
        return data

    @classmethod
    def from_json(cls, data: dict) -> "RequestRecord":
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})
