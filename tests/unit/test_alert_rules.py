"""The shipped alert rules (deploy/prometheus/rules.yaml), checked by Prometheus' own promtool."""

from __future__ import annotations

import subprocess

import yaml

from tests.conftest import PROMETHEUS_RULES, ROOT


def _promtool(promtool, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(promtool), *args], capture_output=True, text=True, timeout=60, check=False)


def test_promtool_accepts_the_rules(promtool):
    result = _promtool(promtool, "check", "rules", str(PROMETHEUS_RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alerts_are_quiet_on_a_healthy_gateway_and_each_fires_on_a_broken_one(promtool):
    tests = PROMETHEUS_RULES.with_name("rules.test.yaml")
    result = _promtool(promtool, "test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr
    # Every alert is tested both ways: one that no test names could fire on a healthy gateway unseen.
    cases = yaml.safe_load(tests.read_text())["tests"]
    quiet = {c["alertname"] for case in cases[:2] for c in case["alert_rule_test"] if not c["exp_alerts"]}
    fired = {c["alertname"] for c in cases[2]["alert_rule_test"] if c["exp_alerts"]}
    assert quiet == fired == alert_names()


def test_operations_doc_uses_the_shipped_rules_file_and_names_every_alert():
    doc = (ROOT / "docs" / "operations.md").read_text()
    assert "deploy/prometheus/rules.yaml" in doc
    assert "- alert:" not in doc  # one copy of the rules: the file
    for name in alert_names():
        assert f"`{name}`" in doc, name


def alert_names() -> set[str]:
    groups = yaml.safe_load(PROMETHEUS_RULES.read_text())["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"]}
