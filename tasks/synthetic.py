"""Procedurally generated tasks for the embedded ``quick`` sequence: no download, deterministic from a seed.

Three different skills so that learning one and forgetting another shows up on a laptop within minutes:
arithmetic (``arith``), symbol manipulation (``reverse``) and multiple choice over word categories (``choice``). Train and test come
from disjoint seeded streams, and any test question that also occurs in train is dropped. ``first_letter`` is a
general-ability probe (evaluated in every row, trained by no ``quick`` task; ``tasks/definitions/first_letter.yaml``).
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from tasks.base import Example

_SPLIT_SALT = {"train": 1_000_003, "validation": 2_000_003, "test": 3_000_017}
WORDS = (
    "apple bread chair delta eagle fable grape honey igloo joker kayak lemon mango noble ocean piano quilt "
    "river sugar tiger umbra vivid wagon xenon yacht zebra amber brick cloud dream ember frost globe harp "
    "ivory jelly knife lunar maple nylon olive pearl quest robin stone tulip unity vapor whale yodel zesty"
).split()


def _stream(name: str, split: str, seed: int) -> random.Random:
    if split not in _SPLIT_SALT:
        raise ValueError(f"unknown split {split!r}; valid: {sorted(_SPLIT_SALT)}")
    return random.Random(f"{name}:{seed}:{_SPLIT_SALT[split]}")


def _dedupe(examples: list[Example], split: str, make: Callable[[str], list[Example]]) -> list[Example]:
    """Drop test/validation questions that also appear in the train split."""
    if split == "train":
        return examples
    seen = {e.question for e in make("train")}
    return [e for e in examples if e.question not in seen]


def arith(split: str, n_train: int = 2000, n_test: int = 300, seed: int = 0) -> list[Example]:
    """Two-step integer arithmetic: ``a op b op c`` with small operands, left to right."""

    def make(sp: str) -> list[Example]:
        rng = _stream("arith", sp, seed)
        out = []
        for i in range(n_train if sp == "train" else n_test):
            a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 9)
            op1, op2 = rng.choice("+-"), rng.choice("+-*")
            ab = a + b if op1 == "+" else a - b
            res = ab + c if op2 == "+" else ab - c if op2 == "-" else ab * c
            q = f"Compute ({a} {op1} {b}) {op2} {c}."
            target = f"{a} {op1} {b} = {ab}. {ab} {op2} {c} = {res}.\nAnswer: {res}"
            out.append(Example(id=f"arith-{sp}-{i}", question=q, answer=str(res), target=target))
        return out

    return _dedupe(make(split), split, make)


def reverse(split: str, n_train: int = 2000, n_test: int = 300, seed: int = 0, length: int = 5,
            sep: str = " ") -> list[Example]:
    """Reverse a list of words (symbol manipulation; the answer is the reversed list, words joined by ``sep``)."""

    def make(sp: str) -> list[Example]:
        rng = _stream("reverse", sp, seed)
        out = []
        for i in range(n_train if sp == "train" else n_test):
            items = rng.sample(WORDS, length)
            q = "Reverse the order of these words: " + sep.join(items)
            ans = sep.join(reversed(items))
            out.append(Example(id=f"reverse-{sp}-{i}", question=q, answer=ans, target=f"Answer: {ans}"))
        return out

    return _dedupe(make(split), split, make)


CATEGORIES: dict[str, tuple[str, ...]] = {
    "animal": ("tiger", "horse", "rabbit", "eagle", "whale", "snake", "mouse", "sheep", "camel", "zebra", "otter",
               "goose", "shark", "moose", "llama", "panda", "frog", "wolf", "duck", "deer"),
    "fruit": ("apple", "mango", "grape", "lemon", "peach", "cherry", "banana", "melon", "plum", "kiwi", "pear",
              "papaya", "lime", "apricot", "guava", "fig", "olive", "date", "berry", "orange"),
    "colour": ("red", "blue", "green", "yellow", "purple", "brown", "pink", "black", "white", "grey", "violet",
               "indigo", "beige", "crimson", "teal", "maroon", "navy", "ivory", "amber", "cyan"),
    "tool": ("hammer", "wrench", "saw", "drill", "chisel", "pliers", "shovel", "rake", "axe", "spanner",
             "screwdriver", "ladder", "file", "clamp", "trowel", "mallet", "level", "vice", "crowbar", "sander"),
    "vehicle": ("car", "truck", "bus", "bicycle", "train", "tram", "boat", "ship", "plane", "scooter", "van",
                "taxi", "tractor", "yacht", "canoe", "jeep", "lorry", "rocket", "subway", "ferry"),
    "country": ("France", "Japan", "Brazil", "Canada", "Egypt", "India", "Kenya", "Mexico", "Norway", "Peru",
                "Spain", "Chile", "Italy", "Ghana", "Nepal", "Poland", "Greece", "Cuba", "Iran", "Sweden"),
}


def choice(split: str, n_train: int = 2000, n_test: int = 300, seed: int = 0, n_options: int = 4) -> list[Example]:
    """Multiple choice: which option belongs to a named category? (answer: a letter)."""

    def make(sp: str) -> list[Example]:
        rng = _stream("choice", sp, seed)
        letters = string.ascii_uppercase[:n_options]
        cats = sorted(CATEGORIES)
        out = []
        for i in range(n_train if sp == "train" else n_test):
            cat, *others = rng.sample(cats, n_options)
            words = [rng.choice(CATEGORIES[cat])] + [rng.choice(CATEGORIES[c]) for c in others]
            rng.shuffle(words)
            right = next(w for w in words if w in CATEGORIES[cat])
            letter = letters[words.index(right)]
            # Each option is written "word (letter)" so the letter can be copied right after naming the word
            # (an induction-style lookup that a 135M model learns in a few CPU minutes); with "A) word" the
            # model named the right word 80% of the time but mapped it to the wrong letter (version 1).
            opts = "\n".join(f"{w} ({L})" for L, w in zip(letters, words, strict=True))
            article = "an" if cat[0] in "aeiou" else "a"
            q = f"Which of these is {article} {cat}?\n{opts}"
            target = f"{right} ({letter}) is {article} {cat}.\nAnswer: {letter}"
            out.append(Example(id=f"choice-{sp}-{i}", question=q, answer=letter, target=target))
        return out

    return _dedupe(make(split), split, make)


# Common English nouns for the ``first_letter`` probe (hand-written so the task needs no download); train and
# test take disjoint halves of it, so a test word is never a train word.
NOUNS = tuple(sorted(set((
    "anchor apron arrow attic autumn badge bakery balloon banjo barrel basket beach beard bell bench blanket "
    "bottle bridge bucket butter button cabin cable camera candle canyon carpet castle cattle ceiling cellar "
    "circle circus closet coffee collar copper cottage cotton county cousin crayon cricket crown curtain cushion "
    "daisy dancer desert diamond dinner doctor dolphin donkey dragon drawer driver engine envelope eraser fabric "
    "falcon farmer feather fence finger flag flower forest fountain garden garlic giant ginger glove goat "
    "gravel guitar hammer harbor helmet hill hobby hockey honey hospital hotel island jacket jungle kettle "
    "kitchen kitten ladder lantern laptop leather letter library lizard locket magnet marble market meadow "
    "mirror monkey mountain muffin museum napkin needle nephew number orchard oven oyster paddle palace pancake "
    "parrot pencil pepper pillow pirate planet pocket potato puppet puzzle rabbit radio rainbow ribbon rocket "
    "saddle salad sandal school scissors shadow shelter silver singer sister soccer spider sponge spoon squirrel "
    "stable statue student summer sunset sweater table teacher temple tennis thunder ticket toast tomato tower "
    "tractor turtle umbrella uncle valley velvet village violin volcano waiter wallet window winter wizard wolf "
    "yogurt zipper jar iron igloo insect ink kite key knot nest nurse net queen quiz quarter vase van "
    "yard yarn zoo zero elbow eagle egg orange owl ocean jelly jewel juice"
).split())))


def first_letter(split: str, n_train: int = 128, n_test: int = 128, seed: int = 0) -> list[Example]:
    """Name the first letter of a word (letter skill; a probe of general ability, not a quick task)."""
    pool = [w for i, w in enumerate(NOUNS) if (i % 2 == 0) == (split == "train")]
    rng = _stream("first_letter", split, seed)
    words = rng.sample(pool, min(len(pool), n_train if split == "train" else n_test))
    return [Example(id=f"first_letter-{split}-{i}", question=f"What is the first letter of the word \"{w}\"?",
                    answer=w[0], target=f"Answer: {w[0]}") for i, w in enumerate(words)]


GENERATORS: dict[str, Callable[..., list[Example]]] = {"arith": arith, "reverse": reverse, "choice": choice,
                                                     "first_letter": first_letter}
