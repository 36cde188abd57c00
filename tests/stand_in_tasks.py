"""Small scored stand-in tasks shared by the RL tests (imported like ``memgen_reference``: tests/ is on sys.path).

The tiny random model almost never scores on the benchmark tasks, which would give GRPO, REINFORCE++ and weaver
GRPO zero advantages and nothing to test; ``LetterTask``'s scorer gives every group a spread of rewards."""

from __future__ import annotations

from tasks.base import Example, render_prompt


class LetterTask:
    """A real task whose score varies on random text: the fraction of ASCII letters in the completion."""

    name, version, domain, max_new_tokens = "letters", "1", "test", 8

    def load(self, split: str, limit: int | None = None, seed: int = 0) -> list[Example]:
        return [Example(id=f"l{i}", question=f"Write some letters ({i}).", answer="", target="abc")
                for i in range(limit or 8)]

    def prompt(self, example: Example, tokenizer=None) -> str:
        return render_prompt(example.question, tokenizer)

    def extract(self, completion: str) -> str | None:
        return completion

    def score(self, completion: str, example: Example) -> float:
        return sum(c.isascii() and c.isalpha() for c in completion) / max(len(completion), 1)
