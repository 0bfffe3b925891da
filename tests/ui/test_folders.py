"""Paths a client names stay inside their folder: '..', absolute paths and symlinks out are refused."""

import os

import pytest

from lorakit.ui.folders import Missing, Refused, contained, inside


@pytest.fixture
def root(tmp_path):
    (tmp_path / "root" / "sweep" / "r=4").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "root" / "out")
    os.symlink(tmp_path / "root" / "sweep", tmp_path / "root" / "alias")
    return tmp_path / "root"


def test_inside_resolves_relative_paths(root):
    assert inside(root, "sweep/r=4", "run") == (root / "sweep" / "r=4").resolve()
    assert inside(root, "alias/r=4", "run") == (root / "sweep" / "r=4").resolve()  # a symlink that stays in


@pytest.mark.parametrize("bad", ["../outside", "sweep/../../outside", "/etc", "//etc", "", " ", "sweep//r=4",
                                 "sweep\\r=4", "a\x00b", ".", "sweep/..", "out", "out/x"])
def test_inside_refuses_what_leaves_or_is_malformed(root, bad):
    with pytest.raises(Refused if bad != "out/x" else (Refused, Missing)):
        inside(root, bad, "run")


def test_symlink_out_is_refused_even_when_its_target_exists(root):
    with pytest.raises(Refused, match="outside its folder"):
        inside(root, "out", "run")
    assert not contained(root, root / "out") and contained(root, root / "alias")


def test_missing_is_not_refused(root):
    with pytest.raises(Missing, match="does not exist"):
        inside(root, "sweep/r=8", "run")
