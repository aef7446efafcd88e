"""Credentials in the config reach neither the workers' job file nor MLflow's params."""

import json

import pytest

from petseg import config
from petseg.config import REDACTED, is_secret_key, redact_secrets

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize(
    "key,secret",
    [
        ("spark.hadoop.fs.s3a.secret.key", True),
        ("spark.hadoop.fs.s3a.access.key", True),
        ("spark.hadoop.fs.s3a.session.token", True),
        ("spark.hadoop.fs.azure.account.key.acct.dfs.core.windows.net", True),
        ("spark.hadoop.fs.azure.sas.container.acct.blob.core.windows.net", True),
        ("spark.hadoop.fs.azure.account.oauth2.client.secret", True),
        ("spark.ssl.keyStorePassword", True),
        ("spark.hadoop.google.cloud.auth.service.account.private.key", True),
        ("spark.sql.shuffle.partitions", False),
        ("infer.key_column", False),
        ("spark.executorEnv.TF_USE_LEGACY_KERAS", False),
        ("spark.hadoop.fs.azure.account.auth.type", False),
        # Keys whose names say only what the value unlocks: an encryption key, a connection string, an API key.
        ("spark.hadoop.fs.s3a.encryption.key", True),
        ("spark.hadoop.fs.s3a.bucket.pets.encryption.key", True),
        ("spark.hadoop.fs.s3a.server-side-encryption.key", True),
        ("spark.hadoop.fs.gs.encryption.key", True),
        ("spark.hadoop.fs.azure.storage.connection_string", True),
        ("spark.hadoop.azure.connection_string", True),
        ("spark.cosmos.connectionString", True),
        ("spark.executorEnv.WANDB_API_KEY", True),
        ("spark.executorEnv.SERVICE_APIKEY", True),
        ("spark.hadoop.fs.cosn.userinfo.apiKey", True),
        ("spark.hadoop.fs.s3a.encryption.algorithm", False),
        ("spark.io.encryption.keySizeBits", False),
        ("spark.io.encryption.keygen.algorithm", False),
        ("data.image_size", False),
    ],
)
def test_credential_keys_are_told_apart_by_name(key, secret):
    assert is_secret_key(key) is secret


def test_redaction_keeps_everything_else():
    values = {"spark": {"conf": {"fs.s3a.secret.key": SECRET, "spark.sql.shuffle.partitions": "4"}}, "train": {"epochs": 2}}
    assert redact_secrets(values) == {
        "spark": {"conf": {"fs.s3a.secret.key": REDACTED, "spark.sql.shuffle.partitions": "4"}}, "train": {"epochs": 2}
    }


def test_the_workers_job_spec_carries_no_secret(tmp_path):
    from petseg.train.launch import training_spec

    secrets = tmp_path / "secrets.yaml"
    secrets.write_text(f"spark:\n  conf:\n    spark.hadoop.fs.s3a.secret.key: {SECRET}\n")
    cfg = config.load(conf_files=[secrets], overrides=[f"data.dataset={tmp_path}/pets", f"train.output_dir={tmp_path}/run",
                                                       "model.encoder_weights=none"], job="train")
    spec = training_spec(cfg, stats={"train": (10, 2), "test": (4, 2)})
    text = json.dumps(spec)
    assert SECRET not in text and spec["config"]["spark"]["conf"]["spark.hadoop.fs.s3a.secret.key"] == REDACTED
    assert spec["config"]["train"]["epochs"] == cfg.train.epochs


def test_mlflow_params_carry_no_secret(tmp_path, monkeypatch):
    import mlflow

    from petseg.tracking import tracked_run

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file://{tmp_path / 'mlruns'}"
    cfg = config.MlflowConfig(enabled=True, tracking_uri=uri, experiment="petseg-secrets")
    params = {"spark.conf.fs.s3a.secret.key": SECRET, "train.epochs": 2}
    with tracked_run(cfg, name="secrets", params=params) as tracked:
        run_id = tracked.run_id
    logged = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id).data.params
    assert logged == {"spark.conf.fs.s3a.secret.key": REDACTED, "train.epochs": "2"}
