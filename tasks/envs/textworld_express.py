"""TextWorldExpress games (CookingWorld, Coin Collector, TextWorld-Commonsense, ...) as an agent task.

Games are generated offline from (game, parameters, fold, seed) by the ``textworld-express`` package (a Java
simulator driven through py4j; needs ``java`` on PATH). Train episodes use the train fold's seeds and the
simulator's gold action sequence as the expert; test episodes use the test fold's seeds.

Departure: the simulator's gold path for Coin Collector is an unseeded random walk (seed 20000's came back as 3, 5
and 7 moves on three resets, and once longer than ``max_turns``, so the expert failed its own episode). The game is
seeded, its expert was not: for ``coin`` the expert is instead the shortest path to the coin, found by a
breadth-first search over the seeded game (``shortest_coin_path``), the same on every machine.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import Any

from harness.agent import Message
from tasks.base import Example, TaskError
from tasks.envs.base import AgentTaskOptions, EnvTask

# Games whose simulator gold path is a random walk, replaced by a breadth-first search (see the module docstring).
SEARCHED_GOLD = {"coin"}
# Resets one search may spend before it gives up (a 3-room map needs about 4; 11 rooms with doors well under 100).
MAX_SEARCH_RESETS = 400

# One JVM per concurrently running episode, reused across episodes (a JVM takes ~0.3 s to start, ~70 MB).
_FREE: list[Any] = []


def _acquire(step_limit: int) -> Any:
    if _FREE:
        env = _FREE.pop()
        env.envStepLimit = step_limit
        return env
    if shutil.which("java") is None:
        raise TaskError("textworld_express needs Java: install a JRE (e.g. apt-get install default-jre-headless)")
    try:
        from textworld_express import TextWorldExpressEnv
    except ImportError as exc:
        raise TaskError("textworld_express needs the package: pip install textworld-express") from exc
    return TextWorldExpressEnv(envStepLimit=step_limit)


def _release(env: Any) -> None:
    _FREE.append(env)


def format_observation(obs: str, valid: list[str] | None, max_valid: int) -> str:
    obs = obs.strip()
    # "examine X" is valid for every visible object and never needed to win: listing it only eats context.
    valid = [v for v in valid or [] if not v.startswith("examine ")]
    if valid and max_valid > 0:
        shown = sorted(valid)[:max_valid]
        obs += "\nValid actions: " + ", ".join(shown) + (" ..." if len(valid) > max_valid else "")
    return obs


class TextWorldExpressEnvironment:
    """One seeded TextWorldExpress episode behind the ``harness.agent.Environment`` protocol."""

    def __init__(self, game: str, params: str, fold: str, seed: int, step_limit: int = 100, max_valid: int = 40):
        self.game, self.params, self.fold, self.seed = game, params, fold, seed
        self.step_limit, self.max_valid = step_limit, max_valid
        self._env: Any = None
        self.task_description = ""

    def _sim_reset(self, gold: bool = False) -> tuple[str, dict[str, Any]]:
        """A fresh start of the seeded game (with the simulator's gold path when ``gold``): (observation, info)."""
        if self._env is None:
            self._env = _acquire(self.step_limit)
        return self._env.reset(seed=self.seed, gameFold=self.fold, gameName=self.game, gameParams=self.params,
                               generateGoldPath=gold)

    def _first_observation(self, obs: str, info: dict[str, Any]) -> str:
        self.task_description = info["taskDescription"]
        return f"{self.task_description}\n\n{format_observation(obs, info.get('validActions'), self.max_valid)}"

    def reset(self) -> str:
        return self._first_observation(*self._sim_reset())

    def expert_episode(self) -> tuple[str, list[str]]:
        """The episode's first observation (as ``reset`` returns it, the episode reset) and the expert's actions:
        the search for ``SEARCHED_GOLD`` games, else the simulator's gold path, from the same reset."""
        if self.game in SEARCHED_GOLD:
            gold = self.shortest_coin_path()
            return self.reset(), gold
        first = self._first_observation(*self._sim_reset(gold=True))
        return first, list(self._env.getGoldActionSequence())

    def _replay(self, actions: list[str]) -> dict[str, Any]:
        """The simulator's info after a fresh reset and ``actions``."""
        _, info = self._sim_reset()
        for a in actions:
            _, _, _, info = self._env.step(a)
        return info

    def shortest_coin_path(self) -> list[str]:
        """The fewest actions (moves, doors opened as needed) from the start to taking the coin, by breadth-first search.

        A state is what ``look around`` shows (the room and its doors), expanded by ``move``/``open door`` actions in
        sorted order, so ties break the same way everywhere. Starts with ``look around``, as the simulator's gold does.
        """
        start = self._replay([])
        frontier, seen, resets = [([], start)], {start["look"]}, 1
        while frontier:
            nxt = []
            for path, info in frontier:
                if "take coin" in info["validActions"]:
                    return ["look around", *path, "take coin"]
                for a in sorted(info["validActions"]):
                    if not a.startswith(("move ", "open door")):
                        continue
                    if resets >= MAX_SEARCH_RESETS:
                        raise TaskError(f"textworld_express {self.game} seed {self.seed}: no coin within "
                                        f"{MAX_SEARCH_RESETS} searched states; use fewer numLocations in options.games")
                    after, resets = self._replay([*path, a]), resets + 1
                    if after["look"] not in seen:
                        seen.add(after["look"])
                        nxt.append(([*path, a], after))
            frontier = nxt
        raise TaskError(f"textworld_express {self.game} seed {self.seed}: the coin is unreachable from the start")

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        obs, _, done, info = self._env.step(action)
        success = bool(info["tasksuccess"])
        done = bool(done or success or info["taskfailure"])
        text = format_observation(obs, None if done else info.get("validActions"), self.max_valid)
        return text, float(info["score"]), done, {"success": success, "moves": info["numMoves"]}

    def close(self) -> None:
        if self._env is not None:
            _release(self._env)
            self._env = None


@dataclass(frozen=True)
class TextWorldExpressOptions(AgentTaskOptions):
    """Options of the ``textworld_express`` task (``options:`` in tasks/definitions/textworld_express.yaml)."""

    games: dict[str, str] = field(default_factory=lambda: {"coin": "numLocations=3,numDistractorItems=0,includeDoors=0"})
    """Game name -> TextWorldExpress parameter string; episodes cycle through the games in this order."""
    train_episodes: int = 300
    """Train-fold episodes available (seeds 0..n-1 of the fold, spread over the games)."""
    test_episodes: int = 100
    """Test-fold episodes available."""
    step_limit: int = 50
    """Simulator moves before it ends an episode by itself."""
    max_valid_actions: int = 25
    """Valid actions listed after each observation, 'examine X' left out (0 = none: the agent must guess)."""



FOLDS = {"train": "train", "validation": "dev", "dev": "dev", "test": "test"}
# TextWorldExpress's seed ranges per fold (getValidSeedsTrain/Dev/Test): train 0.., dev 10000.., test 20000..
FOLD_SEED_BASE = {"train": 0, "dev": 10000, "test": 20000}


class TextWorldExpressTask(EnvTask):
    options_class = TextWorldExpressOptions

    def __init__(self, definition, data_root=None):
        super().__init__(definition, data_root)
        if not self.options.games:
            raise TaskError(f"task {self.name}: options.games is empty; name at least one game, e.g. coin")
        self._cache: dict[str, list[Example]] = {}

    def _env_for(self, meta: dict[str, Any]) -> TextWorldExpressEnvironment:
        return TextWorldExpressEnvironment(meta["game"], meta["params"], meta["fold"], int(meta["seed"]),
                                           self.options.step_limit, self.options.max_valid_actions)

    def episodes(self, split: str) -> list[Example]:
        if split not in FOLDS:
            raise TaskError(f"task {self.name} has no split {split!r}; it has {sorted(FOLDS)}")
        if split in self._cache:
            return self._cache[split]
        fold = FOLDS[split]
        n = self.options.train_episodes if split == "train" else self.options.test_episodes
        games = list(self.options.games.items())
        out = []
        for k in range(n):
            game, params = games[k % len(games)]
            seed = FOLD_SEED_BASE[fold] + k // len(games)
            meta = {"game": game, "params": params, "fold": fold, "seed": seed}
            # The first observation is the question; it is generated lazily (games are cheap, ~50 ms each).
            out.append(Example(id=f"{game}-{fold}-{seed}", question="", answer="success", target="", meta=meta))
        self._cache[split] = out
        return out

    def _materialise(self, ep: Example) -> Example:
        if ep.question:
            return ep
        env = self._env_for(ep.meta)
        try:
            first, gold = env.expert_episode()
        finally:
            env.close()
        return Example(id=ep.id, question=first, answer=ep.answer,
                       target="\n".join(self.format_reply(a) for a in gold), meta={**ep.meta, "gold_actions": gold})

    def load(self, split: str, limit: int | None = None, seed: int = 0) -> list[Example]:
        from tasks.base import subsample

        eps = [self._materialise(e) for e in subsample(self.episodes(split), limit, seed)]
        if split != "train":
            return eps
        return [t for ep in eps for t in self.turn_examples(ep, self.expert_replies(ep))]

    @staticmethod
    def format_reply(action: str) -> str:
        return f"<action>{action}</action>"

    def expert_replies(self, example: Example) -> list[str]:
        return [self.format_reply(a) for a in self._materialise(example).meta["gold_actions"]]

    def make_env(self, example: Example) -> TextWorldExpressEnvironment:
        return self._env_for(example.meta)

    def initial_messages(self, example: Example) -> list[Message]:
        return super().initial_messages(self._materialise(example))
