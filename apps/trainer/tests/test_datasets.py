"""Parquet round trip, atomic save, validation of every kind of bad file, and the summary."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rlops_trainer import datasets
from rlops_trainer.datasets import (
    COLUMNS,
    DatasetError,
    DatasetMeta,
    Transitions,
    box_space,
    discrete_space,
    load,
    save,
    space_bounds,
    to_table,
    validate,
)

OBS_DIM = 4


def make_transitions(
    lengths: tuple[int, ...] = (5, 8, 7), n_actions: int = 2, propensities: bool = True, seed: int = 0
) -> Transitions:
    """Episodes of the given lengths; the last one is truncated, the others terminate."""
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    episode_id = np.repeat(np.arange(len(lengths)) * 10 + 3, lengths)
    step = np.concatenate([np.arange(k) for k in lengths])
    ends = np.cumsum(lengths) - 1
    terminated = np.zeros(n, dtype=bool)
    truncated = np.zeros(n, dtype=bool)
    terminated[ends[:-1]] = True
    truncated[ends[-1]] = True
    logp = (
        np.full(n, -math.log(n_actions), dtype=np.float32) if propensities else np.full(n, np.nan, np.float32)
    )
    meta = DatasetMeta(
        env_id="CartPole-v1",
        observation_space=box_space([-4.8, -np.inf, -0.42, -np.inf], [4.8, np.inf, 0.42, np.inf]),
        action_space=discrete_space(n_actions),
        behavior_policy="random",
        source="test",
        extra={"note": "made by the test"},
    )
    return Transitions(
        episode_id=episode_id.astype(np.int64),
        step=step.astype(np.int64),
        observation=rng.standard_normal((n, OBS_DIM)).astype(np.float32),
        action=rng.integers(0, n_actions, n).astype(np.int64),
        reward=np.ones(n, dtype=np.float32),
        next_observation=rng.standard_normal((n, OBS_DIM)).astype(np.float32),
        terminated=terminated,
        truncated=truncated,
        behavior_logp=logp,
        meta=meta,
    )


def write_table(table: pa.Table, path: Path) -> Path:
    pq.write_table(table, path)
    return path


def replace_column(table: pa.Table, name: str, array: pa.Array) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, array)


def assert_names(exc: DatasetError, path: Path, column: str | None = None, row: int | None = None) -> str:
    message = str(exc)
    assert str(path) in message
    if column is not None:
        assert f"column '{column}'" in message
        assert exc.column == column
    if row is not None:
        assert f"row {row}" in message
        assert exc.row == row
    return message


# --------------------------------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------------------------------


def test_round_trip_preserves_every_column_and_the_fingerprint(tmp_path: Path) -> None:
    t = make_transitions()
    path = save(t, tmp_path / "sub" / "d.parquet")
    assert path == tmp_path / "sub" / "d.parquet"
    back = load(path)
    for c in COLUMNS:
        np.testing.assert_array_equal(getattr(back, c), getattr(t, c), err_msg=c)
        assert getattr(back, c).dtype == getattr(t, c).dtype, c
    assert back.meta == t.meta
    assert back.fingerprint() == t.fingerprint()
    assert load(path).fingerprint() == back.fingerprint()
    assert back.select(back.episode_id == 13).fingerprint() != back.fingerprint()


def test_unknown_propensities_are_stored_as_nulls_and_read_back_as_nan(tmp_path: Path) -> None:
    t = make_transitions(propensities=False)
    path = save(t, tmp_path / "d.parquet")
    assert pq.read_table(path).column("behavior_logp").null_count == len(t)
    back = load(path)
    assert np.isnan(back.behavior_logp).all()
    assert not back.has_propensities
    assert back.fingerprint() == t.fingerprint()


def test_metadata_is_valid_json_with_infinite_bounds_as_strings(tmp_path: Path) -> None:
    t = make_transitions()
    path = save(t, tmp_path / "d.parquet")
    raw = json.loads(pq.read_schema(path).metadata[b"rlops"])
    assert raw["observation_space"]["high"] == [4.8, "inf", 0.42, "inf"]
    assert raw["action_space"] == {"type": "Discrete", "n": 2}
    low, high = space_bounds(raw["observation_space"])
    assert np.isneginf(low[1])
    assert np.isposinf(high[3])
    assert high[0] == 4.8


def test_partitioned_directory_loads_in_name_order(tmp_path: Path) -> None:
    t = make_transitions()
    table = to_table(t)
    folder = tmp_path / "parts"
    folder.mkdir()
    write_table(table.slice(12), folder / "part-1.parquet")
    write_table(table.slice(0, 12), folder / "part-0.parquet")
    (folder / "_SUCCESS").write_text("")
    assert load(folder).fingerprint() == t.fingerprint()


# --------------------------------------------------------------------------------------------------
# Atomic save
# --------------------------------------------------------------------------------------------------


def _crash_midway(writer: pq.ParquetWriter, table: pa.Table, *args: Any, **kwargs: Any) -> None:
    # The writer has put Parquet's header in the file by now: half a file, then the crash.
    raise RuntimeError("disk gone")


def test_failed_save_leaves_the_previous_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save(make_transitions(seed=1), tmp_path / "d.parquet")
    before = path.read_bytes()
    monkeypatch.setattr(pq.ParquetWriter, "write_table", _crash_midway)
    with pytest.raises(RuntimeError, match="disk gone"):
        save(make_transitions(seed=2), path)
    assert path.read_bytes() == before
    assert load(path).fingerprint() == make_transitions(seed=1).fingerprint()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.parquet"]


def test_failed_first_save_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pq.ParquetWriter, "write_table", _crash_midway)
    with pytest.raises(RuntimeError):
        save(make_transitions(), tmp_path / "d.parquet")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_invalid_data(tmp_path: Path) -> None:
    t = make_transitions()
    t.reward[3] = np.nan
    with pytest.raises(DatasetError, match="row 3"):
        save(t, tmp_path / "d.parquet")
    assert not (tmp_path / "d.parquet").exists()


# --------------------------------------------------------------------------------------------------
# Bad files
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def good_table() -> pa.Table:
    return to_table(make_transitions())


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file") as e:
        load(tmp_path / "nope.parquet")
    assert_names(e.value, tmp_path / "nope.parquet")


def test_truncated_file(tmp_path: Path) -> None:
    path = save(make_transitions(), tmp_path / "d.parquet")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="not a readable Parquet file") as e:
        load(path)
    assert_names(e.value, path)


def test_file_that_is_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    path.write_text("episode_id,step\n0,0\n")
    with pytest.raises(DatasetError, match="not a readable Parquet file") as e:
        load(path)
    assert_names(e.value, path)


def test_missing_columns_are_named_with_the_expected_list(tmp_path: Path, good_table: pa.Table) -> None:
    path = write_table(good_table.drop_columns(["reward", "behavior_logp"]), tmp_path / "d.parquet")
    with pytest.raises(DatasetError) as e:
        load(path)
    message = assert_names(e.value, path)
    assert "missing column(s) reward, behavior_logp" in message
    assert "expected columns: " + ", ".join(COLUMNS) in message


def test_missing_metadata(tmp_path: Path, good_table: pa.Table) -> None:
    path = write_table(good_table.replace_schema_metadata({}), tmp_path / "d.parquet")
    with pytest.raises(DatasetError, match=r"missing dataset metadata.*'rlops'") as e:
        load(path)
    assert_names(e.value, path)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (b"{not json", "not JSON"),
        (b'{"env_id": "x"}', "missing keys"),
        (
            json.dumps(
                {
                    "env_id": "x",
                    "observation_space": {"type": "Box", "shape": [4], "low": [0] * 4, "high": [1] * 4},
                    "action_space": {"type": "Box", "shape": [1]},
                    "behavior_policy": "b",
                    "source": "s",
                    "schema_version": 1,
                }
            ).encode(),
            r"action_space.low must be a list of 1 numbers",
        ),
        (
            json.dumps(
                {
                    "env_id": "x",
                    "observation_space": {"type": "Box", "shape": [4], "low": [0] * 3, "high": [1] * 4},
                    "action_space": {"type": "Discrete", "n": 2},
                    "behavior_policy": "b",
                    "source": "s",
                    "schema_version": 1,
                }
            ).encode(),
            r"observation_space.low must be a list of 4 numbers",
        ),
        (
            json.dumps(
                {
                    "env_id": "x",
                    "observation_space": {"type": "Box", "shape": [4], "low": [0] * 4, "high": [1] * 4},
                    "action_space": {"type": "Discrete", "n": 2},
                    "behavior_policy": "b",
                    "source": "s",
                    "schema_version": 99,
                }
            ).encode(),
            "schema_version 99 is newer",
        ),
    ],
)
def test_invalid_metadata(tmp_path: Path, good_table: pa.Table, metadata: bytes, expected: str) -> None:
    path = write_table(good_table.replace_schema_metadata({b"rlops": metadata}), tmp_path / "d.parquet")
    with pytest.raises(DatasetError, match=expected) as e:
        load(path)
    assert "invalid dataset metadata" in assert_names(e.value, path)


def test_wrong_dtype(tmp_path: Path, good_table: pa.Table) -> None:
    actions = pa.array([str(a) for a in good_table.column("action").to_pylist()])
    path = write_table(replace_column(good_table, "action", actions), tmp_path / "d.parquet")
    with pytest.raises(DatasetError) as e:
        load(path)
    message = assert_names(e.value, path, column="action")
    assert "wrong type string; expected int64" in message


def test_wrong_observation_shape_names_the_row(tmp_path: Path, good_table: pa.Table) -> None:
    rows = [list(map(float, r)) for r in good_table.column("observation").to_pylist()]
    rows[17] = rows[17][:3]
    path = write_table(
        replace_column(good_table, "observation", pa.array(rows, type=pa.list_(pa.float32()))),
        tmp_path / "d.parquet",
    )
    with pytest.raises(DatasetError) as e:
        load(path)
    message = assert_names(e.value, path, column="observation", row=17)
    assert "has 3 values, expected 4" in message


def test_fixed_size_lists_of_the_wrong_width(tmp_path: Path, good_table: pa.Table) -> None:
    flat = pa.array(np.zeros(len(good_table) * 3, dtype=np.float32))
    narrow = pa.FixedSizeListArray.from_arrays(flat, 3)
    path = write_table(replace_column(good_table, "next_observation", narrow), tmp_path / "d.parquet")
    with pytest.raises(DatasetError, match="has 3 values, expected 4") as e:
        load(path)
    assert_names(e.value, path, column="next_observation", row=0)


@pytest.mark.parametrize(
    ("column", "row", "value"),
    [
        ("observation", 5, np.nan),
        ("next_observation", 11, np.inf),
        ("reward", 2, np.nan),
        ("reward", 19, -np.inf),
    ],
)
def test_non_finite_values(tmp_path: Path, column: str, row: int, value: float) -> None:
    t = make_transitions()
    arr = getattr(t, column)
    if arr.ndim == 2:
        arr[row, 2] = value
    else:
        arr[row] = value
    path = write_table(to_table(t), tmp_path / "d.parquet")
    with pytest.raises(DatasetError, match="not finite") as e:
        load(path)
    assert_names(e.value, path, column=column, row=row)


def test_action_outside_the_action_space(tmp_path: Path) -> None:
    t = make_transitions()
    t.action[7] = 2
    path = write_table(to_table(t), tmp_path / "d.parquet")
    with pytest.raises(DatasetError) as e:
        load(path)
    message = assert_names(e.value, path, column="action", row=7)
    assert "action 2 is outside the action space Discrete(2): expected 0..1" in message


def test_negative_action(tmp_path: Path) -> None:
    t = make_transitions()
    t.action[0] = -1
    with pytest.raises(DatasetError, match="action -1 is outside") as e:
        load(write_table(to_table(t), tmp_path / "d.parquet"))
    assert_names(e.value, tmp_path / "d.parquet", column="action", row=0)


def test_fractional_action(tmp_path: Path, good_table: pa.Table) -> None:
    actions = good_table.column("action").to_numpy().astype(np.float64)
    actions[9] = 0.5
    path = write_table(replace_column(good_table, "action", pa.array(actions)), tmp_path / "d.parquet")
    with pytest.raises(DatasetError, match=r"value 0\.5 is not an integer") as e:
        load(path)
    assert_names(e.value, path, column="action", row=9)


def test_whole_float_actions_are_accepted(tmp_path: Path, good_table: pa.Table) -> None:
    actions = good_table.column("action").to_numpy().astype(np.float64)
    path = write_table(replace_column(good_table, "action", pa.array(actions)), tmp_path / "d.parquet")
    np.testing.assert_array_equal(load(path).action, actions.astype(np.int64))


@pytest.mark.parametrize(
    ("row", "value", "expected"),
    [
        (4, 0.1, "log-propensity 0.1 > 0 means a probability above 1"),
        (6, -np.inf, "probability 0"),
        (8, np.nan, "has no propensity but the first row has one"),
    ],
)
def test_bad_propensities(tmp_path: Path, row: int, value: float, expected: str) -> None:
    t = make_transitions()
    t.behavior_logp[row] = value
    path = write_table(to_table(t), tmp_path / "d.parquet")
    with pytest.raises(DatasetError, match=expected) as e:
        load(path)
    assert_names(e.value, path, column="behavior_logp", row=row)


def test_propensity_present_in_part_only(tmp_path: Path) -> None:
    t = make_transitions(propensities=False)
    t.behavior_logp[12] = -0.5
    with pytest.raises(DatasetError, match="has a propensity but the first row has none") as e:
        load(write_table(to_table(t), tmp_path / "d.parquet"))
    assert_names(e.value, tmp_path / "d.parquet", column="behavior_logp", row=12)


def test_log_propensity_zero_is_valid(tmp_path: Path) -> None:
    t = make_transitions()
    t.behavior_logp[:] = 0.0
    assert load(save(t, tmp_path / "d.parquet")).has_propensities


def test_episode_rows_not_contiguous(tmp_path: Path) -> None:
    t = make_transitions()
    t.episode_id[15] = 3  # an episode_id seen in rows 0-4 comes back
    path = write_table(to_table(t), tmp_path / "d.parquet")
    with pytest.raises(DatasetError, match="episode_id 3 appears again") as e:
        load(path)
    assert_names(e.value, path, column="episode_id", row=15)


@pytest.mark.parametrize("value", [1, 2])
def test_steps_not_increasing(tmp_path: Path, value: int) -> None:
    t = make_transitions()
    t.step[8] = value  # episode 13 covers rows 5-12 with steps 0-7: row 7 holds step 2
    path = write_table(to_table(t), tmp_path / "d.parquet")
    with pytest.raises(DatasetError, match=f"step {value} follows step 2 in episode_id 13") as e:
        load(path)
    assert_names(e.value, path, column="step", row=8)


def test_terminated_and_truncated_both_true(tmp_path: Path) -> None:
    t = make_transitions()
    t.truncated[4] = True
    path = write_table(to_table(t), tmp_path / "d.parquet")
    with pytest.raises(DatasetError, match="terminated and truncated are both true") as e:
        load(path)
    assert_names(e.value, path, row=4)


def test_episode_end_flag_in_the_middle_of_an_episode(tmp_path: Path) -> None:
    t = make_transitions()
    t.terminated[2] = True
    with pytest.raises(DatasetError, match="continues in the next row") as e:
        load(write_table(to_table(t), tmp_path / "d.parquet"))
    assert_names(e.value, tmp_path / "d.parquet", column="terminated", row=2)


def test_null_in_a_required_column(tmp_path: Path, good_table: pa.Table) -> None:
    rewards = good_table.column("reward").to_pylist()
    rewards[10] = None
    path = write_table(
        replace_column(good_table, "reward", pa.array(rewards, pa.float32())), tmp_path / "d.parquet"
    )
    with pytest.raises(DatasetError, match="null value") as e:
        load(path)
    assert_names(e.value, path, column="reward", row=10)


def test_errors_in_a_partitioned_dataset_name_the_part_file_and_its_row(tmp_path: Path) -> None:
    t = make_transitions()
    t.observation[15, 0] = np.nan
    table = to_table(t)
    folder = tmp_path / "parts"
    folder.mkdir()
    write_table(table.slice(0, 12), folder / "part-0.parquet")
    write_table(table.slice(12), folder / "part-1.parquet")
    with pytest.raises(DatasetError) as e:
        load(folder)
    assert_names(e.value, folder / "part-1.parquet", column="observation", row=3)


def test_parts_with_different_metadata(tmp_path: Path) -> None:
    t = make_transitions()
    folder = tmp_path / "parts"
    folder.mkdir()
    table = to_table(t)
    write_table(table.slice(0, 12), folder / "a.parquet")
    meta = json.loads(table.schema.metadata[b"rlops"])
    meta["source"] = "elsewhere"
    write_table(table.slice(12).replace_schema_metadata({b"rlops": json.dumps(meta)}), folder / "b.parquet")
    with pytest.raises(DatasetError, match=r"metadata differs from the first part file a\.parquet") as e:
        load(folder)
    assert_names(e.value, folder / "b.parquet")


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"no \*\.parquet part files"):
        load(tmp_path)


def test_validation_is_vectorised_and_fast_on_a_million_rows() -> None:
    import time

    n = 1_000_000
    t = make_transitions(lengths=(n // 2, n // 2))
    start = time.perf_counter()
    validate(t)
    assert time.perf_counter() - start < 3.0


# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------


def test_inspect_summary_numbers() -> None:
    t = make_transitions(lengths=(2, 4, 6))
    t.reward[:] = np.arange(12, dtype=np.float32)  # returns 0+1, 2+3+4+5, 6+...+11
    t.action[:] = [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    t.behavior_logp[:] = np.log([0.5, 0.5, 0.04, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 1.0])
    s = datasets.inspect(t)
    assert s["n_transitions"] == 12
    assert s["n_episodes"] == 3
    assert s["returns"]["mean"] == pytest.approx((1 + 14 + 51) / 3)
    assert s["returns"]["min"] == 1
    assert s["returns"]["max"] == 51
    assert s["returns"]["median"] == 14
    assert s["episode_length"]["mean"] == 4
    assert s["episodes_terminated"] == 2
    assert s["episodes_truncated"] == 1
    assert s["actions"]["counts"] == [7, 5]
    assert s["actions"]["shares"] == pytest.approx([7 / 12, 5 / 12])
    prop = s["propensity"]
    assert prop["share_with_propensity"] == 1.0
    assert prop["min"] == pytest.approx(0.04, rel=1e-6)
    assert prop["share_below_0.05"] == pytest.approx(1 / 12)
    # Action 1: weights 1/0.5 (x4) and 1/0.04 -> ESS = (8 + 25)^2 / (4 * 4 + 625)
    per_action = {row["action"]: row for row in prop["per_action"]}
    assert per_action[1]["ess"] == pytest.approx(33**2 / 641, rel=1e-5)
    assert per_action[1]["rows"] == 5
    assert sum(s["return_histogram"]["counts"]) == 3
    assert s["fingerprint"] == t.fingerprint()
    json.dumps(s, allow_nan=False)


def test_inspect_without_propensities_is_json_safe() -> None:
    s = datasets.inspect(make_transitions(propensities=False))
    assert s["propensity"]["share_with_propensity"] == 0.0
    assert s["propensity"]["min"] is None
    assert s["propensity"]["per_action"] == []
    json.dumps(s, allow_nan=False)
