"""alignment.cache: build once, reuse, key by config, clean failure, one build across racing processes."""

import multiprocessing
import os
import time
from dataclasses import dataclass

import pytest

from alignment.cache import cached_artifact
from alignment.config import config_hash, load_config


@dataclass
class ToyWorld:
    seed: int = 0
    size: int = 3


def writer(calls: list):
    def build(out):
        calls.append(out)
        (out / "data.txt").write_text("x" * 10)

    return build


def test_second_call_reuses_without_building(in_tmp):
    calls = []
    first = cached_artifact("world", ToyWorld(), writer(calls))
    second = cached_artifact("world", ToyWorld(), writer(calls))
    assert first == second == in_tmp / "runs" / "cache" / f"world-{config_hash(ToyWorld())}"
    assert len(calls) == 1 and calls[0] != first  # built in a temporary directory, then renamed
    assert (first / "data.txt").read_text() == "x" * 10
    assert load_config(ToyWorld, [f"config={first / 'config.yaml'}"]) == ToyWorld()  # resolved config beside it
    assert (first / "DONE").is_file()


def test_different_config_gives_different_dir(in_tmp):
    calls = []
    a = cached_artifact("world", ToyWorld(seed=0), writer(calls))
    b = cached_artifact("world", ToyWorld(seed=1), writer(calls))
    c = cached_artifact("tokenizer", ToyWorld(seed=0), writer(calls))
    assert len({a, b, c}) == 3 and len(calls) == 3


def test_failing_build_leaves_nothing(in_tmp):
    def broken(out):
        (out / "half.txt").write_text("half")
        raise RuntimeError("out of disk")

    with pytest.raises(RuntimeError, match="out of disk"):
        cached_artifact("world", ToyWorld(), broken)
    cache = in_tmp / "runs" / "cache"
    assert [p for p in os.listdir(cache) if not p.endswith(".lock")] == []
    calls = []
    cached_artifact("world", ToyWorld(), writer(calls))  # and the next call builds it properly
    assert len(calls) == 1


def test_build_may_not_write_reserved_names(in_tmp):
    with pytest.raises(ValueError, match="reserved"):
        cached_artifact("world", ToyWorld(), lambda out: (out / "DONE").write_text(""))
    assert not (in_tmp / "runs" / "cache" / f"world-{config_hash(ToyWorld())}").exists()


def _race(barrier, log_path, results):
    def slow_build(out):
        with open(log_path, "a") as f:  # O_APPEND: one line per build, from any process
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # the other process arrives while this one is still building
        (out / "data.txt").write_text("complete")

    barrier.wait()
    path = cached_artifact("world", ToyWorld(), slow_build)
    results.put((str(path), (path / "data.txt").read_text()))


def test_racing_processes_build_once(in_tmp):
    # fork: the children inherit the imported modules and the working directory (no 4 s re-import).
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    log_path = in_tmp / "builds.log"
    procs = [ctx.Process(target=_race, args=(barrier, log_path, results)) for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=20) for _ in procs]
    for p in procs:
        p.join(timeout=20)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(log_path.read_text().splitlines()) == 1
    assert outcomes[0] == outcomes[1] and outcomes[0][1] == "complete"


@dataclass
class ToyPolicy:
    world: str = ""  # the path of the artifact it is built from, as the discriminators' key holds the policy's


def test_symlinked_cache_gives_the_same_keys(in_tmp):
    """A sweep links runs/<sweep>/cache to runs/cache: an artifact whose key holds another artifact's path must be
    found through either spelling, not built again."""
    calls = []
    (in_tmp / "runs" / "sweep").mkdir(parents=True)
    (in_tmp / "runs" / "cache").mkdir()
    (in_tmp / "runs" / "sweep" / "cache").symlink_to("../cache")
    built = []
    for runs_dir in ("runs", "runs/sweep"):
        world = cached_artifact("world", ToyWorld(), writer(calls), runs_dir=runs_dir)
        built.append(cached_artifact("policy", ToyPolicy(world=str(world)), writer(calls), runs_dir=runs_dir))
    assert built[0] == built[1]
    assert len(calls) == 2  # the world and the policy, once each


def test_remains_of_a_killed_build_are_removed(in_tmp):
    target = cached_artifact("world", ToyWorld(), writer([]))
    other = cached_artifact("world", ToyWorld(seed=1), writer([]))
    stale = target.parent / f".{target.name}.tmp-killed"  # what a SIGKILLed build leaves
    (stale / "part").mkdir(parents=True)
    running = target.parent / f".{other.name}.tmp-running"  # another key's build, maybe in progress: not ours
    running.mkdir()
    (target / "DONE").unlink()
    target.rename(target.parent / "moved")  # force a rebuild of the same key
    cached_artifact("world", ToyWorld(), writer([]))
    assert not stale.exists() and running.is_dir() and (target / "DONE").is_file()
