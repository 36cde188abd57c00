"""ALFWorld: game discovery on a small hand-made stand-in in the layout ``alfworld-download`` produces, and the
messages a user without the package or the game files gets. (Playing the games needs the real package and data.)"""

from __future__ import annotations

import importlib.util
import json

import pytest

from tasks.base import TaskError
from tasks.envs.alfworld import AlfWorldEnvironment, find_games
from tasks.registry import get_task


def make_trial(root, split, folder, trial, task_type, solvable=True, goal="put a clean mug on the desk"):
    d = root / "json_2.1.1" / split / folder / trial
    d.mkdir(parents=True)
    traj = {"task_type": task_type, "task_id": f"{folder}/{trial}", "pddl_params": {"object_target": "Mug"},
            "plan": {"high_pddl": [{"discrete_action": {"action": "GotoLocation", "args": ["desk"]}}]},
            "turk_annotations": {"anns": [{"task_desc": goal, "high_descs": ["walk to the desk"]}]}}
    (d / "traj_data.json").write_text(json.dumps(traj))
    (d / "game.tw-pddl").write_text(json.dumps({"pddl_domain": "(define ...)", "grammar": "{}",
                                                "pddl_problem": "(define ...)", "solvable": solvable}))
    return d


@pytest.fixture
def standin(tmp_path):
    make_trial(tmp_path, "valid_unseen", "pick_clean_then_place_in_recep-Mug-None-Desk-1", "trial_T1",
               "pick_clean_then_place_in_recep")
    make_trial(tmp_path, "valid_unseen", "pick_and_place_simple-Pen-None-Shelf-2", "trial_T2",
               "pick_and_place_simple", goal="put a pen on the shelf")
    make_trial(tmp_path, "valid_unseen", "pick_and_place_simple-Pen-None-Shelf-3", "trial_T3",
               "pick_and_place_simple", solvable=False)
    make_trial(tmp_path, "valid_unseen", "pick_and_place_with_movable_recep-Pen-Bowl-Shelf-4", "trial_T4",
               "pick_and_place_with_movable_recep")
    make_trial(tmp_path, "valid_unseen", "pick_heat_then_place_in_recep-AppleSliced-None-Fridge-5", "trial_T5",
               "pick_heat_then_place_in_recep")
    make_trial(tmp_path, "train", "look_at_obj_in_light-Book-None-DeskLamp-6", "trial_T6", "look_at_obj_in_light")
    return tmp_path


def test_find_games_filters_like_alfworld(standin):
    games = find_games(standin, "test")
    # unsolvable, movable-receptacle and sliced-object games are skipped, as ALFWorld's own loader does
    assert [g.id for g in games] == ["pick_and_place_simple-Pen-None-Shelf-2/trial_T2",
                                     "pick_clean_then_place_in_recep-Mug-None-Desk-1/trial_T1"]
    assert games[0].meta["goal"] == "put a pen on the shelf"
    assert games[1].meta["task_type"] == "pick_clean_then_place_in_recep"
    assert games[1].meta["game_file"].endswith("trial_T1/game.tw-pddl")
    assert [g.meta["task_type"] for g in find_games(standin, "train")] == ["look_at_obj_in_light"]


def test_task_reads_alfworld_data_and_explains_missing_files(standin, tmp_path, monkeypatch):
    monkeypatch.setenv("ALFWORLD_DATA", str(standin))
    task = get_task("alfworld")
    assert len(task.episodes("test")) == 2
    with pytest.raises(TaskError, match="no split 'dev'"):
        task.episodes("dev")
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path / "missing"))
    with pytest.raises(TaskError, match="alfworld-download"):
        get_task("alfworld").load("test", limit=2)


@pytest.mark.skipif(importlib.util.find_spec("alfworld") is not None, reason="alfworld is installed here")
def test_playing_without_the_package_says_how_to_install(standin):
    game = find_games(standin, "test")[0]
    with pytest.raises(TaskError, match="pip install alfworld"):
        AlfWorldEnvironment(game.meta["game_file"]).reset()
