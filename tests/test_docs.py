"""The docs cannot drift from the code: every config key is in the reference with its default, the
README stays a ten-minute read and links only to pages that exist."""
from __future__ import annotations

import dataclasses
import glob
import os
import re

import pytest
import yaml

import config
from helpers import REPO

REFERENCE = os.path.join(REPO, "docs", "configuration.md")
SECTION_FILES = {"data": "data_config.yaml", "train": "train_config_kd.yaml",
                 "model": "model_config_kd.yaml"}


def reference_tables() -> dict:
    """{section: {key: default text}} from the reference's three key tables."""
    text = open(REFERENCE, encoding="utf-8").read()
    tables = {}
    for section, file in SECTION_FILES.items():
        match = re.search(rf"^### `{re.escape(file)}`\n(.*?)(?=^#|\Z)", text, re.S | re.M)
        assert match, f"docs/configuration.md has no '### `{file}`' table"
        rows = re.findall(r"^\| `([a-z_]+)` \| `([^`]*)` \|", match.group(1), re.M)
        tables[section] = dict(rows)
    return tables


def as_value(text: str):
    value = yaml.safe_load(text)
    if isinstance(value, str):  # YAML 1.1 reads 5e-4 as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


@pytest.mark.parametrize("section", sorted(config.SECTIONS))
def test_every_config_key_is_in_the_reference_with_its_default(section):
    table = reference_tables()[section]
    for f in dataclasses.fields(config.SECTIONS[section]):
        assert f.name in table, f"docs/configuration.md lacks {section}.{f.name}"
        default = dataclasses.asdict(config.SECTIONS[section]())[f.name]
        assert as_value(table[f.name]) == default, (f"{section}.{f.name}: docs say "
                                                     f"{table[f.name]!r}, config.py {default!r}")
    unknown = set(table) - {f.name for f in dataclasses.fields(config.SECTIONS[section])}
    assert not unknown, f"docs/configuration.md documents keys config.py lacks: {unknown}"


def test_shipped_yaml_files_match_the_documented_defaults():
    """The reference documents the dataclass defaults; the shipped files may only restate them."""
    for section, file in SECTION_FILES.items():
        shipped = yaml.safe_load(open(os.path.join(REPO, file))) or {}
        defaults = dataclasses.asdict(config.SECTIONS[section]())
        for key, value in shipped.items():
            assert as_value(str(value)) == defaults[key] or value == defaults[key], (file, key)


README = os.path.join(REPO, "README.md")


def test_readme_is_a_ten_minute_read_with_its_sections():
    text = open(README, encoding="utf-8").read()
    assert len(text.encode()) <= 15_000, len(text.encode())
    headings = re.findall(r"^## (.+)$", text, re.M)
    for needed in ("Results", "Setup and the two commands", "Main commands", "Documentation", "Files"):
        assert needed in headings, headings
    assert "python -m pytest -q" in text and "\n    python distill_trainer.py\n" in text


def test_readme_links_every_docs_page_and_only_pages_that_exist():
    text = open(README, encoding="utf-8").read()
    linked = set(re.findall(r"\]\((docs/[^)#]+)", text))
    for page in linked:
        assert os.path.isfile(os.path.join(REPO, page)), page
    pages = {f"docs/{name}" for name in os.listdir(os.path.join(REPO, "docs")) if name.endswith(".md")}
    assert pages <= linked, pages - linked


def test_docs_pages_link_only_pages_that_exist():
    for name in os.listdir(os.path.join(REPO, "docs")):
        text = open(os.path.join(REPO, "docs", name), encoding="utf-8").read()
        for target in re.findall(r"\]\(([a-z_]+\.md)", text):
            assert os.path.isfile(os.path.join(REPO, "docs", target)), (name, target)


def test_readme_file_map_names_every_top_level_module():
    text = open(README, encoding="utf-8").read()
    for path in glob.glob(os.path.join(REPO, "*.py")):
        assert f"`{os.path.basename(path)}`" in text, os.path.basename(path)
