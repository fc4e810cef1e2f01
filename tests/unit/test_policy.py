"""Policy files: evaluation semantics, strict validation, reloads and the decision cache (no server)."""

from __future__ import annotations

import json
import os
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from structlog.testing import capture_logs

from gateway import document, policy
from gateway.auth.keys import KeyStore, jwk_kid
from gateway.auth.principal import Principal
from gateway.auth.verifier import TokenVerifier, groups_and_scopes
from gateway.errors import AuthenticationError
from gateway.policy import Action, Decision, PolicyError, PolicySet, PolicyStore, load_policies

REPO_ROOT = Path(__file__).resolve().parents[2]
ALICE_CERT = "spiffe://gateway.local/client/alice"
BOB_CERT = "spiffe://gateway.local/client/bob"


def make_principal(
    *,
    cert: str = ALICE_CERT,
    sub: str = "alice",
    groups: tuple[str, ...] = (),
    scopes: tuple[str, ...] = (),
    bound: bool = True,
    jti: str | None = "jti-1",
) -> Principal:
    return Principal(
        cert_identity=cert,
        cert_sha256="ab" * 32,
        subject=sub,
        issuer="https://issuer.gateway.local",
        token_id=jti,
        groups=frozenset(groups),
        scopes=frozenset(scopes),
        token_bound=bound,
    )


ALICE = make_principal()
BOB = make_principal(cert=BOB_CERT, sub="bob", bound=False)


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def load_one(tmp_path: Path, text: str, name: str = "a.yaml") -> PolicySet:
    write(tmp_path, name, text)
    return load_policies(tmp_path)


def decide(
    policies: PolicySet,
    principal: Principal = ALICE,
    *,
    model: str = "mlp",
    version: str | None = "1",
    action: Action = Action.PREDICT,
) -> Decision:
    return policies.evaluate(principal, model=model, version=version, action=action)


def rule(
    rule_id: str,
    *,
    effect: str = "allow",
    principals: str = '"*"',
    models: str = '["*"]',
    versions: str = '"*"',
    actions: str = '"*"',
) -> str:
    """One rule as YAML list item text, indented for a ``rules:`` list."""
    return (
        f"  - id: {rule_id}\n"
        f"    effect: {effect}\n"
        f"    principals: {principals}\n"
        f"    models: {models}\n"
        f"    versions: {versions}\n"
        f"    actions: {actions}\n"
    )


def rules_file(*rules: str) -> str:
    return "rules:\n" + "".join(rules)


# --- decisions ---------------------------------------------------------------------------------------------


def test_decision_reason_and_explanation_name_the_rule() -> None:
    assert Decision(allowed=True, rule_id="r1").reason == "rule r1"
    assert Decision(allowed=True, rule_id="r1").explain() == "allow by rule r1"
    assert Decision(allowed=False, rule_id="d1").explain() == "deny by rule d1"
    assert Decision(allowed=False, rule_id=None).reason == "default deny"
    assert Decision(allowed=False, rule_id=None).explain() == "deny (default deny: no rule allows)"


def test_allow_decision_without_a_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="must name its rule"):
        Decision(allowed=True, rule_id=None)


def test_no_matching_rule_is_default_deny(tmp_path: Path) -> None:
    policies = load_one(tmp_path, rules_file(rule("bob-only", principals="{subjects: [bob]}")))
    assert decide(policies, ALICE) == Decision(allowed=False, rule_id=None)


def test_empty_directory_denies_everything_and_warns(tmp_path: Path) -> None:
    with capture_logs() as logs:
        policies = load_policies(tmp_path)
    assert policies.rule_count == 0
    assert policies.files == ()
    assert decide(policies).allowed is False
    assert [e["log_level"] for e in logs if e["event"] == "policy_directory_empty"] == ["warning"]


def test_file_with_an_empty_rules_list_allows_nothing(tmp_path: Path) -> None:
    policies = load_one(tmp_path, "rules: []\n")
    assert policies.rule_count == 0
    assert decide(policies).rule_id is None


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="not a directory"):
        load_policies(tmp_path / "absent")


def test_matching_allow_names_its_rule(tmp_path: Path) -> None:
    policies = load_one(tmp_path, rules_file(rule("everyone")))
    assert decide(policies) == Decision(allowed=True, rule_id="everyone")


@pytest.mark.parametrize(("deny_file", "allow_file"), [("a.yaml", "b.yaml"), ("b.yaml", "a.yaml")])
def test_deny_overrides_allow_regardless_of_file_order(tmp_path: Path, deny_file: str, allow_file: str) -> None:
    write(tmp_path, allow_file, rules_file(rule("allow-all")))
    write(tmp_path, deny_file, rules_file(rule("deny-mlp", effect="deny", models="[mlp]")))
    policies = load_policies(tmp_path)
    assert decide(policies, model="mlp") == Decision(allowed=False, rule_id="deny-mlp")
    assert decide(policies, model="digits") == Decision(allowed=True, rule_id="allow-all")


def test_deny_overrides_allow_listed_before_it_in_the_same_file(tmp_path: Path) -> None:
    policies = load_one(tmp_path, rules_file(rule("allow-all"), rule("deny-all", effect="deny")))
    assert decide(policies) == Decision(allowed=False, rule_id="deny-all")


def test_first_matching_deny_in_file_name_order_decides(tmp_path: Path) -> None:
    write(tmp_path, "b.yaml", rules_file(rule("deny-b", effect="deny")))
    write(tmp_path, "a.yaml", rules_file(rule("deny-a", effect="deny")))
    policies = load_policies(tmp_path)
    assert policies.files == (str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml"))
    assert decide(policies).rule_id == "deny-a"


def test_first_matching_allow_in_file_order_decides(tmp_path: Path) -> None:
    policies = load_one(tmp_path, rules_file(rule("first"), rule("second")))
    assert decide(policies).rule_id == "first"


# --- principals ---------------------------------------------------------------------------------------------


def test_principals_star_matches_any_caller(tmp_path: Path) -> None:
    policies = load_one(tmp_path, rules_file(rule("anyone", principals='"*"')))
    stranger = make_principal(cert="spiffe://elsewhere/x", sub="x", bound=False)
    assert decide(policies, stranger).allowed


@pytest.mark.parametrize(
    ("principals", "matching", "other"),
    [
        (
            '{cert: ["spiffe://gateway.local/client/*"]}',
            make_principal(cert=BOB_CERT),
            make_principal(cert="spiffe://other.local/client/bob"),
        ),
        ('{subjects: ["svc-*"]}', make_principal(sub="svc-batch"), make_principal(sub="alice")),
        ('{subjects: ["user-?"]}', make_principal(sub="user-7"), make_principal(sub="user-77")),
        ('{groups: ["team-[ab]"]}', make_principal(groups=("team-b",)), make_principal(groups=("team-c",))),
        ('{scopes: ["model:*"]}', make_principal(scopes=("model:read",)), make_principal(scopes=("admin",))),
    ],
)
def test_globs_match_in_each_principal_key(
    tmp_path: Path, principals: str, matching: Principal, other: Principal
) -> None:
    policies = load_one(tmp_path, rules_file(rule("r", principals=principals)))
    assert decide(policies, matching).allowed
    assert not decide(policies, other).allowed


def test_model_globs_match(tmp_path: Path) -> None:
    policies = load_one(tmp_path, rules_file(rule("r", models='["mnist-*", iris]')))
    assert decide(policies, model="mnist-small").allowed
    assert decide(policies, model="iris").allowed
    assert not decide(policies, model="irises").allowed
    assert not decide(policies, model="digits").allowed


def test_globs_are_case_sensitive(tmp_path: Path) -> None:
    policies = load_one(tmp_path, rules_file(rule("r", principals="{subjects: [Alice*]}", models="[MLP]")))
    assert not decide(policies, make_principal(sub="alice"), model="MLP").allowed
    assert not decide(policies, make_principal(sub="Alice"), model="mlp").allowed
    assert decide(policies, make_principal(sub="Alice"), model="MLP").allowed


def test_star_glob_does_not_match_an_empty_identity(tmp_path: Path) -> None:
    policies = load_one(tmp_path, rules_file(rule("r", principals='{cert: ["spiffe://*"], subjects: ["*"]}')))
    assert decide(policies).allowed
    assert not decide(policies, make_principal(cert="")).allowed
    assert not decide(policies, make_principal(sub="")).allowed


@pytest.mark.parametrize("pattern", [ALICE_CERT, "spiffe://*", "spiffe://gateway.local/client/*"])
def test_a_cert_rule_never_matches_a_cn_or_dns_name_spelled_as_a_uri(tmp_path: Path, pattern: str) -> None:
    # A certificate whose CN (or DNS SAN) reads like alice's URI SAN gets the identity "cn:..." ("dns:...").
    policies = load_one(tmp_path, rules_file(rule("r", principals=f'{{cert: ["{pattern}"]}}')))
    assert decide(policies).allowed
    assert not decide(policies, make_principal(cert=f"cn:{ALICE_CERT}")).allowed
    assert not decide(policies, make_principal(cert=f"dns:{ALICE_CERT}")).allowed


def test_dns_and_cn_patterns_match_only_identities_of_their_own_kind(tmp_path: Path) -> None:
    principals = '{cert: ["dns:*.example.test", "cn:batch-*"]}'
    policies = load_one(tmp_path, rules_file(rule("r", principals=principals)))
    assert decide(policies, make_principal(cert="dns:alice.example.test")).allowed
    assert decide(policies, make_principal(cert="cn:batch-7")).allowed
    assert not decide(policies, make_principal(cert="cn:alice.example.test")).allowed
    assert not decide(policies, make_principal(cert="dns:batch-7")).allowed
    assert not decide(policies).allowed  # a URI SAN


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("alice", "must start with spiffe:// (the URI SAN), dns: (a DNS SAN) or cn: (the subject CN)"),
        ("*", "must start with spiffe://"),
        ("*alice", "must start with spiffe://"),
        ("https://example.test/alice", "must start with spiffe://"),
        ("spiffe://", "names nothing after 'spiffe://'"),
        ("cn:", "names nothing after 'cn:'"),
        ("dns:Alice.example.test", "a DNS name is compared in lowercase"),
    ],
)
def test_a_cert_pattern_not_spelled_with_its_identity_type_is_refused(
    tmp_path: Path, pattern: str, problem: str
) -> None:
    # Such a pattern used to match a DNS SAN or a CN; silently matching nothing instead would disarm a deny rule.
    write(tmp_path, "a.yaml", rules_file(rule("r", effect="deny", principals=f'{{cert: ["cn:ok", "{pattern}"]}}')))
    with pytest.raises(PolicyError) as raised:
        load_policies(tmp_path)
    assert str(raised.value).startswith(f"{tmp_path / 'a.yaml'}: rule 'r': principals.cert[1]: {problem}")


def test_principal_keys_are_anded(tmp_path: Path) -> None:
    policies = load_one(
        tmp_path, rules_file(rule("r", principals=f"{{cert: [{ALICE_CERT}], subjects: [alice], groups: [ml]}}"))
    )
    assert decide(policies, make_principal(groups=("ml",))).allowed
    assert not decide(policies, make_principal(groups=())).allowed
    assert not decide(policies, make_principal(sub="bob", groups=("ml",))).allowed
    assert not decide(policies, make_principal(cert=BOB_CERT, groups=("ml",))).allowed


def test_patterns_within_a_key_are_ored(tmp_path: Path) -> None:
    policies = load_one(tmp_path, rules_file(rule("r", principals="{subjects: [alice, bob]}")))
    assert decide(policies, make_principal(sub="alice")).allowed
    assert decide(policies, make_principal(sub="bob")).allowed
    assert not decide(policies, make_principal(sub="carol")).allowed


@pytest.mark.parametrize("key", ["groups", "scopes"])
def test_group_and_scope_lists_match_when_any_value_matches_any_pattern(tmp_path: Path, key: str) -> None:
    policies = load_one(tmp_path, rules_file(rule("r", principals=f"{{{key}: [ops, 'ml-*']}}")))

    def with_values(*values: str) -> Principal:
        return make_principal(**{key: values})

    assert decide(policies, with_values("finance", "ml-research")).allowed
    assert decide(policies, with_values("ops")).allowed
    assert not decide(policies, with_values("finance", "hr")).allowed
    assert not decide(policies, with_values()).allowed


def test_bound_token_true_requires_a_certificate_bound_token(tmp_path: Path) -> None:
    policies = load_one(tmp_path, rules_file(rule("r", principals="{subjects: [alice], bound_token: true}")))
    assert decide(policies, make_principal(bound=True)).allowed
    assert not decide(policies, make_principal(bound=False)).allowed


def test_bound_token_false_matches_only_unbound_tokens(tmp_path: Path) -> None:
    policies = load_one(
        tmp_path, rules_file(rule("allow-all"), rule("deny-unbound", effect="deny", principals="{bound_token: false}"))
    )
    assert decide(policies, make_principal(bound=False)) == Decision(allowed=False, rule_id="deny-unbound")
    assert decide(policies, make_principal(bound=True)) == Decision(allowed=True, rule_id="allow-all")


# --- versions and actions ------------------------------------------------------------------------------------


def test_version_list_matches_only_listed_versions(tmp_path: Path) -> None:
    policies = load_one(tmp_path, rules_file(rule("r", versions='[1, "3"]')))
    assert decide(policies, version="1").allowed
    assert decide(policies, version="3").allowed
    assert not decide(policies, version="2").allowed
    assert not decide(policies, version="13").allowed
    assert not decide(policies, version="latest").allowed


def test_version_list_does_not_match_an_unknown_version(tmp_path: Path) -> None:
    policies = load_one(tmp_path, rules_file(rule("r", versions="[1]")))
    assert decide(policies, version=None) == Decision(allowed=False, rule_id=None)


def test_version_star_matches_any_version_including_unknown(tmp_path: Path) -> None:
    policies = load_one(tmp_path, rules_file(rule("r", versions='"*"')))
    for version in ("1", "42", None):
        assert decide(policies, version=version).allowed


def test_versions_default_to_star_when_omitted(tmp_path: Path) -> None:
    policies = load_one(tmp_path, 'rules:\n  - {id: r, effect: allow, principals: "*", models: ["*"], actions: "*"}\n')
    assert decide(policies, version="9").allowed
    assert decide(policies, version=None).allowed


def test_versions_compare_as_numbers_not_strings(tmp_path: Path) -> None:
    policies = load_one(tmp_path, rules_file(rule("r", versions='["02"]')))
    assert decide(policies, version="2").allowed
    assert decide(policies, version="002").allowed


def test_an_unknown_version_matches_every_deny_naming_versions_and_no_allow_naming_them(tmp_path: Path) -> None:
    """Fail closed: a routed model whose backend reports no version cannot satisfy a version-conditioned rule."""
    policies = load_one(tmp_path, rules_file(rule("allow-all"), rule("deny-v1", effect="deny", versions="[1]")))
    assert decide(policies, version="1").rule_id == "deny-v1"
    assert decide(policies, version="2").rule_id == "allow-all"
    assert decide(policies, version=None).rule_id == "deny-v1"
    (tmp_path / "v2").mkdir()
    only_v2 = load_one(tmp_path / "v2", rules_file(rule("allow-v2", versions="[2]")))
    assert not decide(only_v2, version=None).allowed


def test_action_list_matches_only_listed_actions(tmp_path: Path) -> None:
    policies = load_one(tmp_path, rules_file(rule("r", actions="[metadata, list]")))
    assert decide(policies, action=Action.METADATA).allowed
    assert decide(policies, action=Action.LIST).allowed
    assert not decide(policies, action=Action.PREDICT).allowed
    assert not decide(policies, action=Action.STREAM).allowed


def test_action_star_matches_every_action(tmp_path: Path) -> None:
    policies = load_one(tmp_path, rules_file(rule("r", actions='"*"')))
    assert all(decide(policies, action=action).allowed for action in Action)


@pytest.mark.parametrize("star", ['"*"', '["*"]', "['*']"], ids=["string", "list", "single-quoted-list"])
def test_star_alone_or_as_the_only_list_item_matches_every_action_and_version(tmp_path: Path, star: str) -> None:
    # Istio users write actions: ["*"]; it means what actions: "*" means.
    policies = load_one(tmp_path, rules_file(rule("r", actions=star, versions=star)))
    assert policies.rules[0].actions is None and policies.rules[0].versions is None
    for action in Action:
        for version in ("1", "42", None):
            assert decide(policies, action=action, version=version).allowed


# --- validation ----------------------------------------------------------------------------------------------

GOOD = {
    "id": "r1",
    "effect": "allow",
    "principals": "{subjects: [alice]}",
    "models": "[mlp]",
    "versions": '"*"',
    "actions": "[predict]",
}


def one_rule(**overrides: str | None) -> str:
    """A file with one rule: GOOD with some fields replaced, added, or (None) left out."""
    fields = [f"{key}: {value}" for key, value in {**GOOD, **overrides}.items() if value is not None]
    return "rules:\n  - " + "".join(f"{field}\n    " for field in fields).rstrip(" ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (one_rule(model="[mlp]"), "rule 'r1': unknown key 'model' (did you mean 'models'?)"),
        (one_rule(principals="{certs: [x]}"), "rule 'r1': principals: unknown key 'certs' (did you mean 'cert'?)"),
        ("rules: []\nversion: 1\n", "unknown top-level key 'version'"),
        (one_rule(effect="permit"), "rule 'r1': effect: must be 'allow' or 'deny', got 'permit'"),
        (one_rule(effect="Allow"), "rule 'r1': effect: must be 'allow' or 'deny'"),
        (one_rule(actions="[predict, train]"), "rule 'r1': actions[1]: must be one of predict, stream"),
        (one_rule(actions="predict"), "rule 'r1': actions: must be '*' or a non-empty list"),
        (one_rule(actions="[]"), "rule 'r1': actions: must be '*' or a non-empty list"),
        (one_rule(actions='[predict, "*"]'), "rule 'r1': actions: '*' already means any; write it alone: '*'"),
        (one_rule(versions='["*", 2]'), "rule 'r1': versions: '*' already means any; write it alone: '*'"),
        (one_rule(id=None), "rule #1: missing key 'id'"),
        (one_rule(effect=None), "rule 'r1': missing key 'effect'"),
        (one_rule(principals=None), "rule 'r1': missing key 'principals'"),
        (one_rule(models=None), "rule 'r1': missing key 'models'"),
        (one_rule(actions=None), "rule 'r1': missing key 'actions'"),
        (one_rule(id="5"), "rule #1: id: must be a string"),
        (one_rule(id="'has space'"), "rule #1: id: must be a string of letters"),
        (one_rule(id="''"), "rule #1: id: must be a string"),
        (one_rule(principals="{}"), "rule 'r1': principals: empty mapping; write '*'"),
        (one_rule(principals="any"), "rule 'r1': principals: must be '*' or a mapping"),
        (one_rule(principals="{cert: []}"), "rule 'r1': principals.cert: empty list"),
        (one_rule(principals="{groups: []}"), "rule 'r1': principals.groups: empty list"),
        (one_rule(principals="{subjects: alice}"), "rule 'r1': principals.subjects: must be a non-empty list"),
        (one_rule(principals="{subjects: [alice, '']}"), "rule 'r1': principals.subjects[1]: empty pattern"),
        (one_rule(principals="{scopes: [1]}"), "rule 'r1': principals.scopes[0]: must be a string, got an integer"),
        (one_rule(principals="{bound_token: 'yes'}"), "rule 'r1': principals.bound_token: must be true or false"),
        (one_rule(models="[]"), "rule 'r1': models: empty list"),
        (one_rule(models='""'), "rule 'r1': models: must be a non-empty list of patterns, got a string"),
        (one_rule(models="['']"), "rule 'r1': models[0]: empty pattern"),
        (one_rule(versions="[]"), "rule 'r1': versions: must be '*' or a non-empty list"),
        (one_rule(versions="'2'"), "rule 'r1': versions: must be '*' or a non-empty list"),
        (one_rule(versions="[0]"), "rule 'r1': versions[0]: must be a positive integer, got 0"),
        (one_rule(versions="[1, -1]"), "rule 'r1': versions[1]: must be a positive integer, got -1"),
        (one_rule(versions="[true]"), "rule 'r1': versions[0]: must be a positive integer, got True"),
        (one_rule(versions="[v1]"), "rule 'r1': versions[0]: must be a positive integer, got 'v1'"),
        (one_rule(versions="[1.5]"), "rule 'r1': versions[0]: must be a positive integer, got 1.5"),
        (one_rule(description="5"), "rule 'r1': description: must be a string"),
        ("rules: {id: r1}\n", "rules: must be a list of rules, got a mapping"),
        ("rules:\n", "rules: must be a list of rules, got null"),
        ("rules: [just-a-string]\n", "rule #1: must be a mapping, got a string"),
        ("- rules: []\n", "expected a mapping with a 'rules' list, got a list"),
        ("{}\n", "missing key 'rules'"),
        ("", "empty; expected a mapping with a 'rules' list"),
        ("# only a comment\n", "empty; expected a mapping with a 'rules' list"),
        ("rules: []\n---\nrules: []\n", "more than one YAML document"),
        ("rules: [\n", "invalid YAML"),
        (one_rule() + "    effect: deny\n", "invalid YAML: found duplicate key 'effect' (line 8, column 5)"),
        ("rules: !!python/object/apply:os.system [echo]\n", "invalid YAML"),
    ],
)
def test_invalid_file_is_refused_naming_file_rule_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, "a.yaml", text)
    with pytest.raises(PolicyError) as raised:
        load_policies(tmp_path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message


def test_rule_error_names_the_rule_by_position_when_it_has_no_id(tmp_path: Path) -> None:
    text = rules_file(rule("ok")) + "  - {effect: allow}\n"
    write(tmp_path, "a.yaml", text)
    with pytest.raises(PolicyError, match=r"a\.yaml: rule #2: missing key 'id'$"):
        load_policies(tmp_path)


def test_duplicate_id_across_files_names_both_files(tmp_path: Path) -> None:
    first = write(tmp_path, "a.yaml", rules_file(rule("shared")))
    second = write(tmp_path, "b.yml", rules_file(rule("shared", effect="deny")))
    with pytest.raises(PolicyError) as raised:
        load_policies(tmp_path)
    assert str(raised.value) == f"{second}: rule 'shared': duplicate id, also defined in {first}"


def test_duplicate_id_within_a_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "a.yaml", rules_file(rule("twice"), rule("twice")))
    with pytest.raises(PolicyError) as raised:
        load_policies(tmp_path)
    assert str(raised.value) == f"{path}: rule 'twice': duplicate id, also defined in {path}"


def test_one_invalid_file_refuses_the_whole_directory(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", rules_file(rule("fine")))
    write(tmp_path, "b.yaml", one_rule(effect="maybe"))
    with pytest.raises(PolicyError, match=r"b\.yaml: rule 'r1': effect"):
        load_policies(tmp_path)


def test_yml_files_are_loaded_and_other_files_ignored(tmp_path: Path) -> None:
    write(tmp_path, "a.yml", rules_file(rule("from-yml")))
    write(tmp_path, "README.md", "not a policy\n")
    write(tmp_path, "b.yaml.bak", "rules: [broken\n")
    policies = load_policies(tmp_path)
    assert policies.files == (str(tmp_path / "a.yml"),)
    assert [r.id for r in policies.rules] == ["from-yml"]


def test_broken_link_named_like_a_policy_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "deny.yaml").symlink_to(tmp_path / "gone.yaml")
    with pytest.raises(PolicyError, match=r"deny\.yaml: not a regular file"):
        load_policies(tmp_path)


def test_oversized_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(document, "MAX_FILE_BYTES", 64)
    write(tmp_path, "a.yaml", rules_file(rule("r")))
    with pytest.raises(PolicyError, match="larger than 64 bytes"):
        load_policies(tmp_path)


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_bytes(b"rules: []\n# \xff\n")
    with pytest.raises(PolicyError, match="not UTF-8"):
        load_policies(tmp_path)


# --- decision cache ------------------------------------------------------------------------------------------


def test_cache_returns_the_same_decision_for_the_same_question(tmp_path: Path) -> None:
    policies = load_one(tmp_path, rules_file(rule("r", models="[mlp]")))
    first = decide(policies, model="mlp")
    assert decide(policies, model="mlp") is first
    assert decide(policies, model="digits") == Decision(allowed=False, rule_id=None)
    assert decide(policies, model="mlp") is first


def test_cache_is_not_shared_between_policy_sets(tmp_path: Path) -> None:
    (tmp_path / "allow").mkdir()
    (tmp_path / "deny").mkdir()
    allowing = load_one(tmp_path / "allow", rules_file(rule("allow-all")))
    denying = load_one(tmp_path / "deny", rules_file(rule("deny-all", effect="deny")))
    assert decide(allowing).allowed
    assert decide(denying) == Decision(allowed=False, rule_id="deny-all")
    assert decide(allowing).allowed


def test_cache_stays_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy, "CACHE_MAX_ENTRIES", 8)
    policies = load_one(tmp_path, rules_file(rule("r")))
    for n in range(50):
        assert decide(policies, model=f"model-{n}").allowed
        assert len(policies._cache) <= 8


def test_long_model_names_are_decided_but_not_cached(tmp_path: Path) -> None:
    policies = load_one(tmp_path, rules_file(rule("r")))
    assert decide(policies, model="m" * 10_000).allowed
    assert len(policies._cache) == 0


# --- reloading -----------------------------------------------------------------------------------------------


def replace_file(directory: Path, name: str, text: str) -> None:
    """Write like a deployment tool: a new file renamed over the old one (a new inode, so always a change)."""
    temporary = write(directory, f".{name}.tmp", text)
    os.replace(temporary, directory / name)


def test_store_refuses_to_start_on_an_invalid_directory(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", one_rule(effect="maybe"))
    with pytest.raises(PolicyError, match="effect"):
        PolicyStore(tmp_path, interval_s=0)


def test_store_reload_swaps_in_a_valid_change(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", rules_file(rule("allow-all")))
    store = PolicyStore(tmp_path, interval_s=0)
    before = store.current
    assert decide(before).allowed
    assert store.reload_now() is False

    replace_file(tmp_path, "a.yaml", rules_file(rule("allow-all"), rule("deny-mlp", effect="deny", models="[mlp]")))
    with capture_logs() as logs:
        assert store.reload_now() is True
    assert store.current is not before
    assert decide(store.current) == Decision(allowed=False, rule_id="deny-mlp")
    assert decide(before).allowed  # a request holding the old set finishes on it
    [event] = [e for e in logs if e["event"] == "policy_reloaded"]
    assert event["rules"] == 2
    assert event["files"] == [str(tmp_path / "a.yaml")]


def test_store_reload_refuses_an_invalid_change_and_keeps_the_old_set(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", rules_file(rule("allow-all")))
    store = PolicyStore(tmp_path, interval_s=0)
    before = store.current

    write(tmp_path, "b.yaml", one_rule(model="[mlp]"))
    with capture_logs() as logs:
        assert store.reload_now() is True
    assert store.current is before
    [event] = [e for e in logs if e["event"] == "policy_reload_failed"]
    assert event["log_level"] == "error"
    assert f"{tmp_path / 'b.yaml'}: rule 'r1': unknown key 'model'" in event["error"]

    (tmp_path / "b.yaml").unlink()
    replace_file(tmp_path, "a.yaml", rules_file(rule("allow-digits", models="[digits]")))
    assert store.reload_now() is True
    assert [r.id for r in store.current.rules] == ["allow-digits"]


def test_store_reload_applies_a_removed_file(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", rules_file(rule("allow-all")))
    write(tmp_path, "b.yaml", rules_file(rule("deny-all", effect="deny")))
    store = PolicyStore(tmp_path, interval_s=0)
    assert not decide(store.current).allowed
    (tmp_path / "b.yaml").unlink()
    assert store.reload_now() is True
    assert decide(store.current).allowed


def test_store_watcher_picks_up_a_change_in_the_background(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", rules_file(rule("allow-all")))
    store = PolicyStore(tmp_path, interval_s=0.01)
    store.start()
    try:
        replace_file(tmp_path, "a.yaml", rules_file(rule("deny-all", effect="deny")))
        deadline = time.monotonic() + 5
        while decide(store.current).allowed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert decide(store.current) == Decision(allowed=False, rule_id="deny-all")
    finally:
        store.stop()


# --- the demo policy -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo() -> PolicySet:
    return load_policies(REPO_ROOT / "policies")


@pytest.mark.parametrize("action", list(Action))
@pytest.mark.parametrize(("model", "version"), [("mlp", "1"), ("mlp", "2"), ("mlp", None), ("digits", "1")])
def test_demo_alice_may_do_everything_on_mlp_and_digits(
    demo: PolicySet, model: str, version: str | None, action: Action
) -> None:
    assert decide(demo, ALICE, model=model, version=version, action=action) == Decision(True, "alice-models")


@pytest.mark.parametrize("action", list(Action))
def test_demo_alice_may_use_iris_version_1_only(demo: PolicySet, action: Action) -> None:
    assert decide(demo, ALICE, model="iris", version="1", action=action) == Decision(True, "alice-iris-v1")
    assert not decide(demo, ALICE, model="iris", version="2", action=action).allowed


def test_demo_alice_needs_her_certificate_and_a_bound_token(demo: PolicySet) -> None:
    assert not decide(demo, make_principal(bound=False)).allowed
    assert not decide(demo, make_principal(cert=BOB_CERT)).allowed
    assert not decide(demo, make_principal(sub="mallory")).allowed


def test_demo_alice_may_not_use_other_models(demo: PolicySet) -> None:
    assert decide(demo, ALICE, model="secret") == Decision(allowed=False, rule_id=None)


@pytest.mark.parametrize("action", [Action.METADATA, Action.LIST])
def test_demo_bob_may_read_digits_metadata_and_list_it(demo: PolicySet, action: Action) -> None:
    assert decide(demo, BOB, model="digits", action=action) == Decision(True, "bob-digits-read")


@pytest.mark.parametrize(
    ("model", "action"),
    [("digits", Action.PREDICT), ("digits", Action.STREAM), ("mlp", Action.METADATA), ("iris", Action.LIST)],
)
def test_demo_bob_may_not_run_digits_or_see_other_models(demo: PolicySet, model: str, action: Action) -> None:
    assert decide(demo, BOB, model=model, action=action) == Decision(allowed=False, rule_id=None)


def test_demo_suspended_group_is_denied_even_where_allowed(demo: PolicySet) -> None:
    suspended_alice = make_principal(groups=("suspended",))
    assert decide(demo, suspended_alice, model="mlp") == Decision(allowed=False, rule_id="deny-suspended")
    assert decide(demo, make_principal(cert=BOB_CERT, sub="bob", groups=("suspended",)), model="digits").rule_id == (
        "deny-suspended"
    )


def test_demo_unknown_caller_is_denied_by_default(demo: PolicySet) -> None:
    carol = make_principal(cert="spiffe://gateway.local/client/carol", sub="carol")
    assert decide(demo, carol, action=Action.LIST) == Decision(allowed=False, rule_id=None)


# ------------------------------------------------------------------------ claims, as `gateway policy check` reads them

CLAIM_CASES = [
    ({"groups": ["ml", "ops"], "scope": "predict read"}, {}),
    ({"scp": ["predict"]}, {}),
    ({"roles": ["admin"], "groups": ["ml"]}, {"groups_claim": "roles"}),
    ({"perms": "a b", "scope": "c"}, {"scopes_claim": "perms"}),
    ({"scope": "c", "scp": ["d"]}, {"scopes_claim": "perms"}),  # the configured claim is absent: scope, then scp
    ({"scp": "x y"}, {}),
    ({"groups": "suspended"}, {}),  # a string is not a list of groups: never the set of its characters
    ({"groups": [1]}, {}),
    ({"groups": ["ok", ""]}, {}),
    ({"scope": ["predict"]}, {}),
    ({"scp": [7]}, {}),
]


@pytest.mark.parametrize(("claims", "names"), CLAIM_CASES)
def test_policy_check_reads_groups_and_scopes_exactly_as_the_verifier(tmp_path: Path, claims, names) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    jwk = {**jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": jwk_kid(key), "use": "sig"}
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    verifier = TokenVerifier(
        keys=KeyStore(tmp_path / "jwks.json", interval_s=60), issuer="iss", audience="aud", **names
    )
    base = {"iss": "iss", "aud": "aud", "sub": "alice", "exp": int(time.time()) + 300}
    token = jwt.encode({**base, **claims}, key, algorithm="EdDSA", headers={"kid": jwk_kid(key)})

    def verified() -> tuple[frozenset[str], frozenset[str]]:
        token_claims = verifier.verify(token, cert_x5t=None)
        return token_claims.groups, token_claims.scopes

    assert outcome(lambda: groups_and_scopes(claims, **names)) == outcome(verified)


def outcome(read: Callable[[], Any]) -> Any:
    """What ``read`` returns, or the reason of the AuthenticationError it raises."""
    try:
        return read()
    except AuthenticationError as exc:
        return exc.reason
