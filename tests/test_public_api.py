"""The public names of ``mxfp8`` resolve, and ``__all__`` lists exactly them."""

import mxfp8


def test_all_lists_every_export_and_each_resolves():
    assert sorted(mxfp8.__all__) == sorted([*mxfp8._EXPORTS, "__version__"])
    for name in mxfp8._EXPORTS:
        assert getattr(mxfp8, name) is not None


def test_unknown_name_is_an_attribute_error():
    try:
        mxfp8.not_a_name  # noqa: B018
    except AttributeError as e:
        assert "not_a_name" in str(e)
    else:
        raise AssertionError("expected AttributeError")
