"""docs/config.md: generated from common/config.py, complete, and kept up to date."""

import ast
import re
import subprocess
import sys
import textwrap
import tomllib
from collections import Counter
from dataclasses import fields

import pytest

from common import config, config_reference
from common.config import RESUMABLE_CHANGES, FedLoraConfig, config_keys
from common.config_reference import DOC_PATH, config_reference_markdown
from common.errors import FedLoraError
from tests.conftest import REPO

# Written out here rather than read from the source, so the generator's parsing is checked.
CHOICES = {"task": config.TASKS, "partition": config.PARTITIONS,
           "transfer-dtype": config.TRANSFER_DTYPES, "device": config.DEVICES,
           "strategy": config.STRATEGIES, "client-dp-clipping": config.CLIENT_DP_CLIPPING,
           "selection-metric": config.SELECTION_METRICS, "pooling": config.POOLINGS,
           "head-mode": config.HEAD_MODES, "site-eval-rows": config.SITE_EVAL_ROWS,
           **dict.fromkeys(("check-empty", "check-duplicates", "check-too-long",
                            "check-unknown-labels"), config.DATA_CHECK_POLICIES)}
TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}


def reference_rows() -> list[dict[str, str]]:
    """The table rows of the reference, one per key, cells unescaped as far as tests need."""
    rows = []
    for line in config_reference_markdown().splitlines():
        if not line.startswith("| `"):
            continue
        key, type_name, default, meaning = (
            cell.strip().replace(r"\|", "|") for cell in re.split(r"(?<!\\)\|", line)[1:-1])
        rows.append({"key": key.strip("`"), "type": type_name, "default": default.strip("`"),
                     "meaning": meaning})
    return rows


def test_docs_config_md_is_up_to_date():
    assert DOC_PATH.read_text(encoding="utf-8") == config_reference_markdown(), (
        "docs/config.md is out of date: run `python -m common.config_reference`")


def test_every_key_appears_once_with_its_type_default_and_meaning():
    rows = reference_rows()
    assert Counter(row["key"] for row in rows) == Counter(config_keys())
    by_key = {row["key"]: row for row in rows}
    defaults = FedLoraConfig()
    for f, key in zip(fields(FedLoraConfig), config_keys()):
        row = by_key[key]
        assert row["type"] == TYPES[str(f.type)], key
        default = tomllib.loads(f"v = {row['default']}")["v"]
        expected = getattr(defaults, f.name)
        assert default == expected and type(default) is type(expected), key
        assert row["meaning"].strip(" ."), key
        assert not row["meaning"].startswith(("One of", "Must", "*May change")), (
            f"{key} has no description of its own")


def test_choice_keys_list_exactly_their_allowed_values():
    for row in reference_rows():
        listed = re.search(r"One of ((?:`[^`]+`(?:, )?)+)", row["meaning"])
        if row["key"] in CHOICES:
            assert listed, row["key"]
            assert tuple(re.findall(r"`([^`]+)`", listed.group(1))) == CHOICES[row["key"]]
        else:
            assert listed is None, row["key"]


def test_keys_marked_for_resume_are_the_resumable_ones():
    marked = {row["key"] for row in reference_rows() if "*May change on resume*" in row["meaning"]}
    assert marked == RESUMABLE_CHANGES


@pytest.mark.parametrize("key, wording, bad_value", [
    ("lora-r", "be a positive integer", 0),
    ("trim-fraction", "be in [0, 0.5)", 0.5),
    ("secagg-shares", "be in (0, 1]", 0.0),
    ("max-update-norm", "not be negative", -1.0),
])
def test_stated_ranges_are_the_ones_the_config_enforces(key, wording, bad_value):
    meaning = next(row["meaning"] for row in reference_rows() if row["key"] == key)
    assert f"Must {wording}." in meaning
    with pytest.raises(FedLoraError, match=re.escape(f"{key} must {wording}")):
        FedLoraConfig.from_run_config({key: bad_value})


def test_sections_and_descriptions_survive_wrapped_comments():
    source = textwrap.dedent("""\
        class Example:
            # Storage
            # (a heading on two lines)
            path: str = ""  # where it goes
                            # (a description on two lines)
            size: int = 1  # bytes
            # Network
            port: int = 80  # the port

            def method(self):
                # not a section
                pass
        """)
    config_class = ast.parse(source).body[0]
    statements = config_reference._field_statements(config_class)
    comments = config_reference._comments(source)
    sections = config_reference._sections(config_class, statements, comments)
    assert [(s.heading, s.field_names) for s in sections] == [
        ("Storage (a heading on two lines)", ["path", "size"]), ("Network", ["port"])]
    assert [config_reference._trailing_comment(s, comments) for s in statements] == [
        "where it goes (a description on two lines)", "bytes", "the port"]


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "common.config_reference", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_check_passes_a_fresh_copy_and_fails_a_stale_one(tmp_path):
    copy = tmp_path / "config.md"
    assert run_module("--path", str(copy)).returncode == 0
    assert copy.read_text(encoding="utf-8") == config_reference_markdown()
    assert run_module("--check", "--path", str(copy)).returncode == 0

    copy.write_text(copy.read_text(encoding="utf-8").replace("lora-r", "lora-rank", 1),
                    encoding="utf-8")
    stale = run_module("--check", "--path", str(copy))
    assert stale.returncode == 1
    assert stale.stderr.strip().splitlines() == [
        f"{copy} is out of date: run `python -m common.config_reference --path {copy}`"]
