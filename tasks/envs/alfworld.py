"""ALFWorld (text version) through the ``alfworld`` package, on the user's game files.

Game files live under ``$ALFWORLD_DATA/json_2.1.1/<split>/<task>-<objects>-<trial>/trial_*/`` (``alfworld-download``
puts them in ``~/.cache/alfworld``): ``traj_data.json`` (task type, the annotators' goal sentences, the ALFRED plan)
and ``game.tw-pddl`` (the PDDL game, with a ``solvable`` flag). Discovery follows ``AlfredTWEnv``: the six task
types, no 'movable'/'Sliced' games, solvable games only. Splits: train -> ``train``, validation -> ``valid_seen``,
test -> ``valid_unseen`` (the usual out-of-distribution evaluation set). The expert is ALFWorld's hand-coded
expert (``extra.expert_plan``), replayed step by step to make the SFT trajectories.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from harness.agent import Message
from tasks.base import Example, TaskError
from tasks.envs.base import EnvTask

TASK_TYPES = ("pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
              "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place")
SPLITS = {"train": "train", "validation": "valid_seen", "test": "valid_unseen"}
HOW_TO_GET = ("ALFWorld needs its game files: pip install alfworld && alfworld-download (about 2 GB, into "
              "~/.cache/alfworld), then export ALFWORLD_DATA=~/.cache/alfworld")


def data_root() -> Path:
    root = os.environ.get("ALFWORLD_DATA") or str(Path.home() / ".cache" / "alfworld")
    return Path(root).expanduser()


def find_games(root: Path, split: str) -> list[Example]:
    """The playable games of ``split`` under ``root`` (sorted by path, so ids and order are stable)."""
    folder = root / "json_2.1.1" / SPLITS[split]
    if not folder.is_dir():
        raise TaskError(f"ALFWorld game files not found at {folder}. {HOW_TO_GET}")
    out = []
    for traj in sorted(folder.glob("*/*/traj_data.json")):
        trial = traj.parent
        if "movable" in str(trial) or "Sliced" in str(trial):
            continue
        game = trial / "game.tw-pddl"
        if not game.exists():
            continue
        data = json.loads(traj.read_text(encoding="utf-8"))
        if data.get("task_type") not in TASK_TYPES:
            continue
        if not json.loads(game.read_text(encoding="utf-8")).get("solvable", False):
            continue
        anns = data.get("turk_annotations", {}).get("anns", [])
        goal = anns[0]["task_desc"].strip() if anns else ""
        ep_id = f"{trial.parent.name}/{trial.name}"
        out.append(Example(id=ep_id, question="", answer="success", target="",
                           meta={"game_file": str(game), "task_type": data["task_type"], "goal": goal}))
    if not out:
        raise TaskError(f"no playable ALFWorld games under {folder} (need traj_data.json + solvable game.tw-pddl)")
    return out


class AlfWorldEnvironment:
    """One ALFWorld game through TextWorld's gym interface with ALFWorld's demangler and hand-coded expert."""

    def __init__(self, game_file: str, max_steps: int = 50):
        self.game_file, self.max_steps = game_file, max_steps
        self._env: Any = None
        self.expert_plan: list[str] = []

    def _make(self) -> Any:
        try:
            import textworld
            import textworld.gym
            from alfworld.agents.environment.alfred_tw_env import (
                AlfredDemangler,
                AlfredExpert,
                AlfredExpertType,
            )
        except ImportError as exc:
            raise TaskError(f"alfworld is not installed ({exc.name}). {HOW_TO_GET}") from exc
        infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile", "expert_plan"])
        wrappers = [AlfredDemangler(), AlfredExpert(expert_type=AlfredExpertType.HANDCODED)]
        env_id = textworld.gym.register_game(self.game_file, infos, max_episode_steps=self.max_steps,
                                             wrappers=wrappers)
        return textworld.gym.make(env_id)

    def _plan(self, infos: dict[str, Any]) -> list[str]:
        plan = infos.get("extra.expert_plan") or infos.get("expert_plan") or []
        return list(plan[0] if plan and isinstance(plan[0], list) else plan)

    def reset(self) -> str:
        self._env = self._env or self._make()
        obs, infos = self._env.reset()
        self.expert_plan = self._plan(infos)
        # ALFWorld's first observation starts with a banner ("-= Welcome to TextWorld, ALFRED! =-").
        return obs.split("-= Welcome to TextWorld, ALFRED! =-")[-1].strip()

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        obs, score, done, infos = self._env.step(action)
        won = bool(infos.get("won"))
        self.expert_plan = self._plan(infos)
        return obs.strip(), float(won), bool(done or won), {"success": won}

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


class AlfWorldTask(EnvTask):
    def __init__(self, definition, data_root_dir=None):
        super().__init__(definition, data_root_dir)
        self._games: dict[str, list[Example]] = {}

    def episodes(self, split: str) -> list[Example]:
        if split not in SPLITS:
            raise TaskError(f"task {self.name} has no split {split!r}; it has {sorted(SPLITS)}")
        if split not in self._games:
            self._games[split] = find_games(data_root(), split)
        return self._games[split]

    def make_env(self, example: Example) -> AlfWorldEnvironment:
        return AlfWorldEnvironment(example.meta["game_file"], self.options.max_turns + 5)

    def initial_messages(self, example: Example) -> list[Message]:
        if not example.question:
            env = self.make_env(example)
            try:
                first = env.reset()
            finally:
                env.close()
            example = Example(example.id, first, example.answer, example.target, example.meta)
        return super().initial_messages(example)

    def load(self, split: str, limit: int | None = None, seed: int = 0) -> list[Example]:
        from tasks.base import subsample

        eps = subsample(self.episodes(split), limit, seed)
        if split != "train":
            return eps
        return [t for ep in eps for t in self.turn_examples(ep, self.expert_replies(ep))]

    def expert_replies(self, example: Example) -> list[str]:
        """Follow the hand-coded expert's next action until the game is won (or the turn limit)."""
        env = self.make_env(example)
        replies: list[str] = []
        try:
            env.reset()
            for _ in range(self.options.max_turns):
                if not env.expert_plan:
                    break
                action = env.expert_plan[0]
                replies.append(f"<action>{action}</action>")
                _, _, done, info = env.step(action)
                if done:
                    break
        finally:
            env.close()
        return replies
