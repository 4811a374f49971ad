"""The catalog in registry/ and its registration with timm."""
import subprocess
import sys

import pytest
import timm

from gequiv_timm import registry
from gequiv_timm._resources import registry_dir, weights_dir
from gequiv_timm.cli import main as cli_main


def test_every_catalog_entry_is_registered_with_prefix():
    cat = registry.catalog()
    assert cat, 'empty catalog'
    for name, entry in cat.items():
        assert name.startswith('gequiv_')
        assert timm.is_model(name), name
        fn = timm.models.model_entrypoint(name)
        assert fn.__name__ == name and fn.__module__ == entry.module


def test_builders_are_written_out_in_their_family_module():
    """timm's idiom: a visible ``def gequiv_x(pretrained=False, **kwargs)`` in the family module (not generated),
    and the module's ``default_cfgs`` holds its cfgs."""
    import importlib
    import inspect
    for name, entry in registry.catalog().items():
        mod = importlib.import_module(entry.module)
        src = inspect.getsource(mod)
        assert f'@register_model\ndef {name}(pretrained: bool = False, **kwargs)' in src, name
        assert name in mod.default_cfgs, name


def test_stem_cfg_is_timms_cfg_of_the_backbone_checkpoint():
    ours = timm.models.get_pretrained_cfg('gequiv_p4_resnet18.a1_in1k').to_dict()
    theirs = timm.models.get_pretrained_cfg('resnet18.a1_in1k').to_dict()
    for key in ('hf_hub_id', 'input_size', 'crop_pct', 'mean', 'std', 'interpolation', 'classifier', 'pool_size'):
        assert ours[key] == theirs[key], key
    assert ours['first_conv'] == theirs['first_conv'] + '.lift' and 'url' not in ours


def test_pretrained_tags_and_cfg():
    cfg = timm.models.get_pretrained_cfg('gequiv_p4cnn.rotmnist')
    assert cfg.architecture == 'gequiv_p4cnn' and cfg.tag == 'rotmnist'
    assert cfg.input_size == (1, 28, 28) and cfg.hf_hub_id


def test_resources_found_from_checkout():
    assert (registry_dir() / 'gcnn.toml').exists()
    assert (weights_dir() / 'manifest.json').exists()


def test_builder_signature():
    import inspect
    sig = inspect.signature(timm.models.model_entrypoint('gequiv_p4cnn'))
    assert list(sig.parameters) == ['pretrained', 'kwargs']
    assert sig.parameters['pretrained'].default is False


def test_bad_catalog_names_entry_and_field(tmp_path):
    (tmp_path / 'x.toml').write_text('[gequiv_bad]\nfamily = "gcnn"\nsummary = "x"\n[gequiv_bad.tags.t]\nfoo = 1\n')
    with pytest.raises(registry.CatalogError,
                       match=r"x.toml: entry \[gequiv_bad\]: field 'tags.t' has key\(s\) \['foo'\]"):
        registry.load_catalog(tmp_path)
    # a recipe is code: arguments and cfgs belong to the builder, not the catalog
    (tmp_path / 'x.toml').write_text('[gequiv_bad]\nfamily = "gcnn"\nsummary = "x"\n[gequiv_bad.args]\ngroup = "p4"\n')
    with pytest.raises(registry.CatalogError, match=r"field\(s\) \['args'\] are not catalog data.*def gequiv_bad"):
        registry.load_catalog(tmp_path)
    (tmp_path / 'x.toml').write_text('[plain_name]\nfamily = "gcnn"\nsummary = "x"\n')
    with pytest.raises(registry.CatalogError, match="must start with 'gequiv_'"):
        registry.load_catalog(tmp_path)
    (tmp_path / 'x.toml').write_text('[gequiv_a]\nsummary = "x"\n')
    with pytest.raises(registry.CatalogError, match="field 'family' is required"):
        registry.load_catalog(tmp_path)


def test_cli_list(capsys):
    assert cli_main(['list']) == 0
    out = capsys.readouterr().out
    assert 'gequiv_p4cnn' in out and '.rotmnist' in out


def test_import_registers_in_fresh_process():
    code = "import timm, gequiv_timm; print(len(timm.list_models('gequiv_*')))"
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert int(out.strip()) == len(registry.catalog())


@pytest.mark.parametrize('body, msg', [
    ('[gequiv_a]\nfamily = "gcnn"\nsummary = "x"\n[gequiv_a.tags."é"]\n', 'must be ASCII'),
    ('[gequiv_a]\nfamily = "gcnn"\nsummary = "x"\n[gequiv_a.tags.t]\ninput_size = [1, 28]\n', 'input_size must be'),
    ('[gequiv_a]\nfamily = "gcnn"\nsummary = "x"\n[gequiv_a.tags.t]\ninput_size = [1, 28, 28]\nmean = [0.1, 0.2]\n',
     'mean has 2 values but input_size has 1'),
    ('[gequiv_a]\nfamily = "gcnn"\nsummary = "x"\n[gequiv_a.tags.t]\ncrop_pct = 1.5\n', 'crop_pct'),
    ('[gequiv_a]\nfamily = "gcnn"\nsummary = "x"\nrequires = ["nope"]\n', "unknown extra"),
])
def test_catalog_value_checks(tmp_path, body, msg):
    (tmp_path / 'v.toml').write_text(body, encoding='utf-8')
    with pytest.raises(registry.CatalogError, match=msg):
        registry.load_catalog(tmp_path)


def test_pretrained_without_weights_is_refused_not_random():
    """timm only warns and keeps the random init; we refuse, naming the model and what to do."""
    from gequiv_timm.hub import WeightsError
    with pytest.raises(WeightsError, match='gequiv_rcn_resnet18: pretrained=True but no weights'):
        timm.create_model('gequiv_rcn_resnet18', pretrained=True)


def test_catalog_and_builders_must_name_the_same_models(monkeypatch):
    """An entry without a builder (or a builder without an entry) is a CatalogError at import, naming the fix."""
    import dataclasses

    from gequiv_timm import models
    cat = dict(registry.catalog())
    cat['gequiv_nobuilder'] = dataclasses.replace(cat['gequiv_p4cnn'], name='gequiv_nobuilder')
    monkeypatch.setattr(registry, '_CATALOG', cat)
    with pytest.raises(registry.CatalogError, match=r"gcnn.toml: entry \[gequiv_nobuilder\] has no builder "
                                                    r"`def gequiv_nobuilder\(pretrained=False, \*\*kwargs\)`"):
        models._check_catalog_matches_builders()
    del cat['gequiv_nobuilder'], cat['gequiv_p4cnn']
    with pytest.raises(registry.CatalogError, match=r"builders \['gequiv_p4cnn'\] have no catalog entry"):
        models._check_catalog_matches_builders()
