"""The public API: every name ``__all__`` promises is there, and the errors form one tree."""

from __future__ import annotations

import olmstead


def test_every_public_name_resolves() -> None:
    missing = [name for name in olmstead.__all__ if not hasattr(olmstead, name)]
    assert missing == []
    assert sorted(olmstead.__all__) == olmstead.__all__


def test_every_public_error_is_an_olmstead_error() -> None:
    errors = [
        getattr(olmstead, name)
        for name in olmstead.__all__
        if isinstance(getattr(olmstead, name), type)
        and issubclass(getattr(olmstead, name), Exception)
    ]
    assert len(errors) > 20
    assert all(issubclass(error, olmstead.OlmsteadError) for error in errors)
    assert issubclass(olmstead.OneTimeKeyConflict, olmstead.KeyStateError)
    assert issubclass(olmstead.OneTimeKeyConflict, olmstead.MatrixHttpError)


def test_star_import_needs_no_optional_dependency() -> None:
    namespace: dict[str, object] = {}
    exec("from olmstead import *", namespace)
    assert "OlmMachine" in namespace
    assert "PostgresStore" not in olmstead.__all__
    assert olmstead.PostgresStore.__name__ == "PostgresStore"  # still there, on first use
