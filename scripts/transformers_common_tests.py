"""Run transformers' common model tests (ModelTesterMixin, GenerationTesterMixin, ConfigTester) on Performer.

Not part of CI: it needs transformers' own test tree, which the wheel does not install. Get it from a transformers
checkout (its ``tests/`` folder) or from the sdist (``pip download transformers==X --no-binary :all: --no-deps``,
then ``tests/`` inside the archive; the sdist lacks ``generation/`` and ``exporters/``, whose tests are then not
run and are listed as missing). Use the tree of the installed transformers version.

    .venv/bin/python scripts/transformers_common_tests.py --tests-dir /path/to/transformers/tests [-- PYTEST ARGS]

The tests themselves are in scripts/transformers_common/test_performer_common.py; they import the installed
hf_performer (put a checkout first on PYTHONPATH to test that one instead).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TEST_FOLDER = os.path.join(HERE, "transformers_common")
# What the common tests import beyond this project's own dependencies.
TEST_REQUIREMENTS = ("pytest", "parameterized")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests-dir", required=True, help="transformers' tests/ folder")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest after `--` (e.g. -k init_weights -x)")
    args = parser.parse_args(argv)

    tests_dir = os.path.abspath(args.tests_dir)
    if not os.path.isfile(os.path.join(tests_dir, "test_modeling_common.py")):
        parser.error(f"{tests_dir} has no test_modeling_common.py: pass transformers' tests/ folder")
    missing = [name for name in TEST_REQUIREMENTS if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(f"missing test requirements: {' '.join(missing)} (pip install {' '.join(missing)})")

    env = dict(os.environ, HFP_TRANSFORMERS_TESTS_DIR=tests_dir)
    command = [
        sys.executable, "-m", "pytest",
        "-c", os.path.join(TEST_FOLDER, "pytest.ini"),
        "--rootdir", TEST_FOLDER,
        "-W", "ignore::pytest.PytestUnknownMarkWarning",
        os.path.join(TEST_FOLDER, "test_performer_common.py"),
        "-rfEs", "-s" if "-s" in args.pytest_args else "-q",
        *[a for a in args.pytest_args if a != "-s"],
    ]
    print("+", " ".join(command), flush=True)
    return subprocess.call(command, env=env)


if __name__ == "__main__":
    sys.exit(main())
