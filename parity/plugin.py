"""pytest plugin (``pytest11`` entry point ``parity.plugin``): collect ``ParityResult``s and write ONE report.

Tests ask for the ``parity_record`` fixture and call ``parity_record(result)`` (or ``parity_record(result,
name=...)``); the name defaults to the test's node id. At session end:

* without pytest-xdist, the session writes the suite report (``report.write_suite_report``: ``parity-suite.json``,
  ``parity-suite.md``, ``parity-depth.png``);
* under pytest-xdist each worker writes its results as one JSON shard into a folder the controller hands it
  (``workerinput["parity_shard_dir"]``); the controller, which runs no tests, merges the shards and writes the one
  report.

Where: ``--parity-report DIR``; without it a report is written to ``parity-report/`` only when some test recorded a
result. The plugin does nothing else, so loading it into an unrelated test run is harmless.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import pytest

_KEY = pytest.StashKey[dict]()
_SHARDS = pytest.StashKey[str]()


def pytest_addoption(parser):
    group = parser.getgroup("parity")
    group.addoption("--parity-report", default=None, metavar="DIR",
                    help="write the merged parity suite report (md, json, png) into DIR")


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config):
    config.stash[_KEY] = {}
    if not _is_worker(config):
        config.stash[_SHARDS] = tempfile.mkdtemp(prefix="parity-shards-")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """xdist controller: tell each worker where to put its shard."""
    node.workerinput["parity_shard_dir"] = node.config.stash[_SHARDS]


@pytest.fixture
def parity_record(request):
    """A function ``record(result, name=None)`` that adds a ``ParityResult`` to the session's suite report.

    ``name`` defaults to the test's node id; the run's environment (``report.environment()``) is added to the
    result's provenance when absent.

    Raises (from ``record``):
        TypeError: ``result`` is not a ``ParityResult``.
    """
    from parity.compare import ParityResult
    from parity.report import environment

    store = request.config.stash[_KEY]

    def record(result, name: Optional[str] = None):
        if not isinstance(result, ParityResult):
            raise TypeError(f"parity_record needs a parity.compare.ParityResult, got {type(result).__name__}")
        result.provenance.setdefault("environment", environment())
        store[name or request.node.nodeid] = result.to_dict()
        return result

    return record


def _out_dir(config) -> Optional[Path]:
    opt = config.getoption("parity_report")
    return Path(opt) if opt else None


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    store = config.stash.get(_KEY, {})
    if _is_worker(config):
        shard_dir = config.workerinput.get("parity_shard_dir")
        if shard_dir and store:
            worker = config.workerinput.get("workerid", "w")
            (Path(shard_dir) / f"{worker}.json").write_text(json.dumps(store))
        return
    merged = dict(store)
    shard_dir = config.stash.get(_SHARDS, None)
    if shard_dir and os.path.isdir(shard_dir):
        for shard in sorted(Path(shard_dir).glob("*.json")):
            merged.update(json.loads(shard.read_text()))
        shutil.rmtree(shard_dir, ignore_errors=True)
    out = _out_dir(config)
    if not merged:
        return
    from parity.compare import ParityResult
    from parity.report import DEFAULT_REPORT_DIR, write_suite_report

    results = {name: ParityResult.from_dict(d) for name, d in sorted(merged.items())}
    paths = write_suite_report(results, out or Path(DEFAULT_REPORT_DIR))
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"parity suite report ({len(results)} results): {', '.join(str(p) for p in paths)}")
