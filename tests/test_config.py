import pytest

from keel.config import ConfigError, load_config, parse_config

MINIMAL = """
models:
  chat:
    deployments:
      - base_url: http://127.0.0.1:9101/v1
        api_key: ${UPSTREAM_KEY}
        model: gpt-4o-mini
        dialect: openai
      - base_url: http://127.0.0.1:9102/v1
        api_key: sk-other
    fallbacks: [chat-cheap]
  chat-cheap:
    deployments:
      - base_url: https://dashscope.aliyuncs.com/compatible-mode/v1
        api_key: ${DASHSCOPE_API_KEY}
        model: qwen-turbo
        dialect: dashscope
"""


def test_the_issue_example_loads(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("UPSTREAM_KEY", "sk-upstream-secret")
    monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-ds-secret")
    path = tmp_path / "keel.yaml"
    path.write_text(MINIMAL)
    cfg = load_config(path)
    chat = cfg.models["chat"]
    assert chat.deployments[0].api_key.get_secret_value() == "sk-upstream-secret"
    assert chat.deployments[1].model is None and chat.deployments[1].dialect == "openai"
    assert cfg.models["chat-cheap"].deployments[0].dialect == "dashscope"
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 4000
    # keys never show in a repr
    assert "sk-upstream-secret" not in repr(cfg)


def test_missing_env_var_is_named(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("UPSTREAM_KEY", raising=False)
    monkeypatch.setenv("DASHSCOPE_API_KEY", "x")
    path = tmp_path / "keel.yaml"
    path.write_text(MINIMAL)
    with pytest.raises(ConfigError, match="UPSTREAM_KEY is not set"):
        load_config(path)


def test_env_default() -> None:
    cfg = parse_config(
        {"models": {"m": {"deployments": [{"base_url": "${NOPE_URL:-http://x/v1}"}]}}}
    )
    assert cfg.models["m"].deployments[0].base_url == "http://x/v1"


def test_unknown_key_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"models\.m\.deployments\.0\.rmp: unknown key"):
        parse_config({"models": {"m": {"deployments": [{"base_url": "http://x", "rmp": 5}]}}})


def test_unknown_fallback_group() -> None:
    with pytest.raises(ConfigError, match="unknown model group 'nope'"):
        parse_config(
            {"models": {"m": {"deployments": [{"base_url": "http://x"}], "fallbacks": ["nope"]}}}
        )


def test_not_yaml(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_deployment_names_are_unique_across_groups() -> None:
    # A name keys the deployment's limits, breaker and leases in Redis and labels its metrics.
    with pytest.raises(ConfigError, match=r"models\.b\.deployments\[0\] is named 'east'"):
        parse_config(
            {
                "models": {
                    "a": {"deployments": [{"base_url": "http://x", "name": "east"}]},
                    "b": {"deployments": [{"base_url": "http://y", "name": "east"}]},
                }
            }
        )
    # an explicit name may not take a generated one either
    with pytest.raises(ConfigError, match="is named 'a/0'"):
        parse_config(
            {
                "models": {
                    "a": {
                        "deployments": [
                            {"base_url": "http://x"},
                            {"base_url": "http://y", "name": "a/0"},
                        ]
                    }
                }
            }
        )
    parse_config(
        {"models": {"a": {"deployments": [{"base_url": "http://x"}, {"base_url": "http://y"}]}}}
    )


def _one_deployment(**dep: object) -> dict[str, object]:
    return {"models": {"m": {"deployments": [{"base_url": "http://127.0.0.1:9101/v1", **dep}]}}}


@pytest.mark.parametrize(
    ("dep", "words"),
    [
        ({"base_url": "http://user:pw@127.0.0.1:9101/v1", "api_key": "sk-1"},
         ["credentials (user:password@)", "api_key is set too", "not both"]),
        ({"base_url": "http://user:pw@127.0.0.1:9101/v1", "headers": {"Authorization": "x"}},
         ["credentials", "headers.authorization is set too"]),
        ({"api_key": "sk-1", "headers": {"authorization": "Bearer sk-2"}},
         ["api_key and headers.authorization are both set"]),
        ({"base_url": "127.0.0.1:9101/v1"}, ["http:// or https://"]),
        ({"base_url": "http://127.0.0.1:port/v1"}, ["not a valid URL"]),
    ],
)  # fmt: skip
def test_conflicting_upstream_credentials_are_refused_at_load(
    dep: dict[str, object], words: list[str]
) -> None:
    # aiohttp refuses a URL's credentials next to an Authorization header on every request
    # (a 500 each time); keel refuses the configuration instead, naming the field, never the
    # credentials.
    with pytest.raises(ConfigError) as info:
        parse_config(_one_deployment(**dep))
    msg = str(info.value)
    assert "models.m.deployments.0:" in msg
    for w in words:
        assert w in msg, msg
    assert "Value error" not in msg
    assert "pw@" not in msg and "sk-1" not in msg and "sk-2" not in msg


def test_credentials_in_the_url_alone_are_http_basic_auth() -> None:
    cfg = parse_config(_one_deployment(base_url="https://user:pw@vllm.internal/v1"))
    assert cfg.models["m"].deployments[0].api_key.get_secret_value() == ""


def test_client_connection_settings() -> None:
    s = parse_config(_one_deployment()).server
    assert (s.header_timeout, s.body_timeout, s.keepalive_timeout) == (60.0, 60.0, 75.0)
    assert s.max_connections is None and s.drain_timeout == 25.0
    with pytest.raises(ConfigError, match=r"server\.header_timeout"):
        parse_config({**_one_deployment(), "server": {"header_timeout": 0}})
    with pytest.raises(ConfigError, match=r"server\.max_connections"):
        parse_config({**_one_deployment(), "server": {"max_connections": 0}})
