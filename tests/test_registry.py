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
    (tmp_path / 'x.toml').write_text('[gequiv_bad]\nfamily = "gcnn"\nsummary = "x"\n[gequiv_bad.cfg]\nfoo = 1\n')
    with pytest.raises(registry.CatalogError, match=r"x.toml: entry \[gequiv_bad\]: field 'cfg' has key\(s\) \['foo'\]"):
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
    ('[gequiv_a]\nfamily = "gcnn"\nsummary = "x"\n[gequiv_a.cfg]\ninput_size = [1, 28]\n', 'input_size must be'),
    ('[gequiv_a]\nfamily = "gcnn"\nsummary = "x"\n[gequiv_a.cfg]\ninput_size = [1, 28, 28]\nmean = [0.1, 0.2]\n',
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
