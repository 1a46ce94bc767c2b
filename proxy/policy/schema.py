"""Pydantic models of the YAML files in the policy directory. Unknown keys are errors."""

from __future__ import annotations

import datetime as dt
import functools
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

EU = frozenset(
    "AT BE BG HR CY CZ DK EE FI FR DE GR HU IE IT LV LT LU MT NL PL PT RO SK SI ES SE".split()
)
EEA = EU | {"IS", "LI", "NO"}
REGIONS = {"EU": EU, "EEA": EEA}

Country = Annotated[str, Field(pattern=r"^[A-Z]{2}$")]
Capability = Literal[
    "chat", "streaming", "tools", "vision", "documents", "audio", "json_mode", "reasoning",
    "embeddings", "fim"
]
# Chat request fields that change the answer and that not every route takes (proxy/dialect.py).
Parameter = Literal[
    "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty", "n",
    "logprobs", "top_logprobs", "logit_bias", "reasoning_effort", "prediction", "verbosity",
    "prompt_mode", "safe_prompt", "modalities", "audio", "web_search_options"
]
ThirdPartyAccess = Literal["none", "subprocessors", "partners", "unrestricted"]
TransferMechanism = Literal["none_needed", "adequacy", "scc", "bcr", "dpf"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- routes.yaml ---------------------------------------------------------------------------


class Logging(Strict):
    purpose: str
    retention_days: int | None = Field(default=None, ge=0)


class Posture(Strict):
    """A route's data handling. Anything left out is unknown, and unknown counts as the worst."""

    inference_location: Country | None = None
    storage_location: Country | None = None
    zero_data_retention: Literal["never", "on_contract", "always"] | None = None
    training: Literal["never", "opt_out", "default"] | None = None
    logging: Logging | None = None
    third_party_access: ThirdPartyAccess | None = None
    gdpr_dpa: Literal["none", "available"] | None = None
    transfer_mechanism: TransferMechanism | None = None


class Pricing(Strict):
    currency: Literal["USD", "EUR", "GBP", "CHF"]
    input_per_1m: Decimal = Field(ge=0)
    output_per_1m: Decimal = Field(ge=0)

    @field_validator("input_per_1m", "output_per_1m")
    @classmethod
    def _exact_in_nanos(cls, price: Decimal) -> Decimal:
        # Costs are kept as integer nano-units; a price per 1M tokens with at most three
        # decimals makes every per-token cost a whole number of nano-units.
        if price.as_tuple().exponent < -3:  # type: ignore[operator]
            raise ValueError("at most 3 decimal places (costs are exact nano-units)")
        return price

    @functools.cached_property
    def nanos_per_token(self) -> tuple[int, int]:
        """(input, output) cost of one token in nano-units, exact (see above)."""
        return int(self.input_per_1m * 1000), int(self.output_per_1m * 1000)


class RouteLimits(Strict):
    context_window: int = Field(gt=0)
    max_output_tokens: int | None = Field(default=None, gt=0)


class RouteUpstream(Strict):
    """Per-route overrides of the EUROUTE_UPSTREAM_* limits (README, Upstream)."""

    connect_timeout_s: float | None = Field(default=None, gt=0)
    first_byte_timeout_s: float | None = Field(default=None, gt=0)
    idle_timeout_s: float | None = Field(default=None, gt=0)
    total_timeout_s: float | None = Field(default=None, gt=0)
    max_json_bytes: int | None = Field(default=None, gt=0)
    max_event_bytes: int | None = Field(default=None, gt=0)


class Route(Strict):
    id: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")]
    provider: str
    description: str = ""
    base_url: str | None = None
    base_url_env: str | None = None
    api_key_env: str | None = None
    upstream_model: str
    models: list[str] = Field(min_length=1)
    posture: Posture = Posture()
    pricing: Pricing
    limits: RouteLimits
    capabilities: frozenset[Capability]
    # The API the route speaks (proxy/dialects/) and the optional parameters it takes.
    dialect: Literal["mistral", "openai"] = "mistral"
    parameters: frozenset[Parameter] = frozenset()
    upstream: RouteUpstream | None = None


class Catalog(Strict):
    routes: list[Route] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self) -> Catalog:
        seen: set[str] = set()
        for route in self.routes:
            if route.id in seen:
                raise ValueError(f"route id {route.id!r} appears twice")
            seen.add(route.id)
        return self


# --- contracts.yaml ------------------------------------------------------------------------


class Contract(Strict):
    reference: str = Field(min_length=1)
    signed: dt.date
    expires: dt.date | None = None

    def in_force(self, on: dt.date) -> bool:
        return self.signed <= on and (self.expires is None or on < self.expires)


class ProviderContracts(Strict):
    dpa: Contract | None = None
    zdr: Contract | None = None
    training_opt_out: Contract | None = None


class Contracts(Strict):
    providers: dict[str, ProviderContracts] = {}


# --- <name>.policy.yaml --------------------------------------------------------------------

Residency = Literal["EU", "EEA"] | list[Country]


class Require(Strict):
    inference_residency: Residency | None = None
    storage_residency: Residency | None = None
    zero_data_retention: bool = False
    no_training: bool = False
    dpa_signed: bool = False
    max_provider_retention_days: int | None = Field(default=None, ge=0)
    third_party_access: list[ThirdPartyAccess] | None = None
    transfer_mechanisms: list[TransferMechanism] | None = None


class ModelRules(Strict):
    allow: list[str] = ["*"]
    deny: list[str] = []


class Budget(Strict):
    amount: Decimal = Field(gt=0)
    currency: Literal["USD", "EUR", "GBP", "CHF"]
    period: Literal["day", "month"]


class PolicyLimits(Strict):
    max_output_tokens: int | None = Field(default=None, gt=0)
    budget: Budget | None = None
    requests_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(default=None, gt=0)


class Records(Strict):
    retention_days: int = Field(default=400, gt=0)
    store_content: Literal[False] = False


class Audit(Strict):
    on_write_failure: Literal["reject", "admit"] = "reject"


class Policy(Strict):
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")]
    description: str = ""
    enforcement: Literal["enforce", "dryrun"] = "enforce"
    require: Require = Require()
    models: ModelRules = ModelRules()
    prefer: Literal["listed", "lowest_price"] = "listed"
    limits: PolicyLimits = PolicyLimits()
    records: Records = Records()
    audit: Audit = Audit()


# --- apps.yaml -----------------------------------------------------------------------------


class App(Strict):
    policy: str
    description: str = ""


class Apps(Strict):
    apps: dict[str, App] = {}
