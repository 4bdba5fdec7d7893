"""``ensemble/__init__.py`` is the user guide: ``help(ensemble)`` shows its worked example,
the example runs as written against a real (tiny) ensemble, and every public name resolves."""

from __future__ import annotations

import doctest
import pydoc
import subprocess
import sys
from pathlib import Path

import ensemble

from .builders import picture


def test_help_shows_the_worked_example() -> None:
    text = pydoc.render_doc(ensemble, renderer=pydoc.plaintext)
    assert "Worked example" in text
    assert "RoutedEnsemble.from_pretrained(directory, verify=True" in text
    assert "model.generate([photo]" in text
    assert 'text_only="uniform"' in text
    for name in ensemble.__all__:
        assert name in text, name


def test_every_public_name_resolves() -> None:
    assert ensemble.__all__ == sorted(ensemble.__all__)
    for name in ensemble.__all__:
        assert getattr(ensemble, name) is not None, name
    assert set(ensemble.__all__) <= set(dir(ensemble))
    try:
        ensemble.no_such_name  # noqa: B018
    except AttributeError as error:
        assert "no_such_name" in str(error)
    else:
        raise AssertionError("an unknown name resolved")


def test_importing_the_package_does_not_import_torch() -> None:
    # The slim coordinator image installs the package without torch (deploy/).
    probe = "import sys, ensemble; print('torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == "False"


def test_the_worked_example_runs_as_written(ensemble_dir: Path, tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    picture("red-square").save(photo)
    finder = doctest.DocTestFinder(exclude_empty=True)
    (test,) = finder.find(ensemble, "ensemble", globs={"directory": ensemble_dir, "photo": photo})
    assert len(test.examples) >= 8  # the doctest lines were found, not skipped
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    result = runner.run(test)
    assert result.failed == 0, f"{result.failed} of the guide's examples failed"
