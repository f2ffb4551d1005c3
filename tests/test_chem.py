"""Featurization: shapes, counts, and named errors for bad SMILES."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from labloop.models import FeatureSpec, InvalidMolecule, featurize, parse_many, parse_smiles
from labloop.models.chem import featurize_mols

DATA = Path(__file__).parent / "data"


def test_count_fingerprint_shape_and_values() -> None:
    X = featurize(["CCO", "c1ccccc1", "CCCCCCCCCC"])
    assert X.shape == (3, 2048) and X.dtype == np.float32
    assert (X >= 0).all()
    # benzene: all six atoms share the same environments, so counts exceed 1
    assert X[1].max() >= 6
    assert X[2].sum() > X[0].sum()


def test_bit_fingerprint_is_binary_and_spec_changes_width() -> None:
    X = featurize(["CCO", "CCN"], FeatureSpec(n_bits=512, counts=False))
    assert X.shape == (2, 512)
    assert set(np.unique(X)) <= {0.0, 1.0}


def test_same_molecule_same_features() -> None:
    a, b = featurize(["OCC", "C(O)C"])
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", ["", "   ", "C1CC", "not a molecule", "c1cccc1"])
def test_invalid_smiles_is_a_named_error(bad: str) -> None:
    with pytest.raises(InvalidMolecule) as info:
        parse_smiles(bad)
    assert info.value.smiles == bad


def test_parse_many_keeps_going_and_reports_each_bad_row() -> None:
    with open(DATA / "tpsa_300.csv") as fh:
        smiles = [r["smiles"] for r in csv.DictReader(fh)]
    mols, ok, errors = parse_many(smiles)
    assert len(mols) == len(ok) == len(smiles) - 2
    assert [e.smiles for e in errors] == smiles[-2:]
    assert featurize_mols(mols).shape == (len(mols), 2048)


def test_featurize_raises_on_first_bad_smiles() -> None:
    with pytest.raises(InvalidMolecule, match="C1CC"):
        featurize(["CCO", "C1CC"])


def test_quiet_rdkit_restores_the_log_channels_as_they_were() -> None:
    from rdkit import rdBase

    from labloop.models.chem import _log_status, quiet_rdkit

    rdBase.DisableLog("rdApp.warning")
    rdBase.EnableLog("rdApp.info")
    try:
        before = _log_status()
        with quiet_rdkit():
            assert not any(_log_status().values())
        assert _log_status() == before  # info on and warning off, as the caller had them
    finally:
        rdBase.EnableLog("rdApp.warning")
        rdBase.DisableLog("rdApp.info")
