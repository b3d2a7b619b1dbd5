"""Synthetic card transactions with labelled fraud, and loaders for real transaction tables.

The generative story (:func:`generate_transactions`, every draw from one seeded ``numpy`` generator)
---------------------------------------------------------------------------------------------------
*Places.* ``n_regions`` cities lie on a 3,000 × 2,000 km map; their sizes (Dirichlet) set how many
customers and merchants live there.

*Merchants.* Every city has at least two merchants of each of ten categories (grocery … jewellery), more
for popular categories. A category fixes the typical ticket (a multiplier of the customer's level: fuel
1.2×, electronics 4×, travel 6×) and whether it is sold online (online merchants have no place: a
purchase there happens wherever the customer is).

*Customers.* Each has a home city and a home 15 km around its centre; a spending level (log-normal,
median $40); an activity rate (Gamma, two purchases a day on average); a daily rhythm (a peak hour
around 14:00 ± 2.5 h and a spread of 2–4 h); preferences over categories (Dirichlet around their
popularity); and three regular merchants per category in the home city.

*Legitimate purchases.* Times form a Poisson process over ``warmup_days + days``; the hour follows the
customer's rhythm; the category follows the preferences; the merchant is a regular one 85 % of the
time, else any merchant of that category in the city; the amount is level × category multiplier ×
log-normal(0, 0.6) noise. One customer in ten takes a 2–5-day trip to another city, where purchases
happen at that city's merchants: far from home, yet legitimate.

*Fraud* (``fraud_rate`` of the customers in the scored period, one episode each, ``is_fraud = 1`` and
``fraud_type`` naming the pattern):

- ``card_testing``: 5–15 purchases of $0.50–$5 at new online merchants within 10–30 minutes;
- ``large_amount``: 1–2 purchases of 8–30× the customer's typical ticket at new electronics, jewellery
  or travel merchants;
- ``geo_jump``: 1–3 purchases in a distant city 5–60 minutes after a purchase at home (an impossible
  speed), 2–5× the usual ticket;
- ``odd_hours``: 2–4 purchases between 01:00 and 05:00 at new merchants in the home city, 2–4× the
  usual ticket;
- ``new_merchant``: 1–3 purchases, 2–5× the usual ticket, at new merchants of a category the customer
  never buys, in another city.

*Features* are what a card processor knows at authorisation time, each computed from the card's own
past only: ``amount``, ``hour``, ``category``, ``distance_from_home_km``, ``km_from_prev``,
``minutes_since_prev``, ``speed_kmh`` (implied travel speed from the previous purchase),
``txns_last_hour`` (velocity), ``amount_to_customer_avg`` (amount over the card's geometric-mean
ticket), ``new_merchant``, ``category_share`` (the card's past share of this category) and
``hour_deviation`` (hours from the card's usual time of day). The first ``warmup_days`` only build that
history and are dropped.

Loaders: :func:`load_creditcard` reads the public credit-card fraud schema (``Time, V1…V28, Amount,
Class``); :func:`load_table` any CSV/Parquet with configured feature columns and an optional label.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ebm.anomaly.validation import TableSchema, read_table

CATEGORIES: dict[str, tuple[float, float, bool]] = {
    # name: (popularity, typical ticket × customer level, sold online)
    "grocery": (0.26, 1.0, False),
    "restaurant": (0.18, 0.8, False),
    "fuel": (0.12, 1.2, False),
    "pharmacy": (0.07, 0.6, False),
    "clothing": (0.08, 1.8, False),
    "electronics": (0.04, 4.0, False),
    "travel": (0.03, 6.0, False),
    "entertainment": (0.07, 1.0, False),
    "online_services": (0.13, 0.5, True),
    "jewellery": (0.02, 5.0, False),
}
FRAUD_TYPES = ("card_testing", "large_amount", "geo_jump", "odd_hours", "new_merchant")

NUMERIC_FEATURES = (
    "amount",
    "hour",
    "distance_from_home_km",
    "km_from_prev",
    "minutes_since_prev",
    "speed_kmh",
    "txns_last_hour",
    "amount_to_customer_avg",
    "new_merchant",
    "category_share",
    "hour_deviation",
)
CATEGORICAL_FEATURES = ("category",)
# The detector's input columns, a list because pandas reads a tuple as a single (multi-level) key.
FEATURES = [*NUMERIC_FEATURES, *CATEGORICAL_FEATURES]
ID_COLUMNS = ("transaction_id", "customer_id", "merchant_id", "timestamp")
LABEL = "is_fraud"

TRANSACTIONS_SCHEMA = TableSchema(
    numeric=NUMERIC_FEATURES,
    categorical=CATEGORICAL_FEATURES,
    label=LABEL,
    passthrough=(*ID_COLUMNS, "fraud_type"),
)
CREDITCARD_FEATURES = ("Time", *(f"V{i}" for i in range(1, 29)), "Amount")
CREDITCARD_SCHEMA = TableSchema(numeric=CREDITCARD_FEATURES, label="Class", label_required=True)


@dataclass(frozen=True)
class TransactionsConfig:
    """Size and shape of the synthetic world (see the module docstring)."""

    n_customers: int = 3000
    days: int = 30
    warmup_days: int = 30
    n_regions: int = 12
    fraud_rate: float = 0.15  # of customers with one fraud episode in the scored period
    seed: int = 0

    def __post_init__(self) -> None:
        for name, minimum in (("n_customers", 10), ("days", 1), ("warmup_days", 1), ("n_regions", 2)):
            if getattr(self, name) < minimum:
                raise ValueError(f"{name} must be ≥ {minimum}, got {getattr(self, name)}")
        if not 0 < self.fraud_rate < 1:
            raise ValueError(f"fraud_rate must lie in (0, 1), got {self.fraud_rate}")


@dataclass(frozen=True)
class _World:
    region_xy: np.ndarray  # (R, 2) km
    merchant_region: np.ndarray  # (M,)
    merchant_category: np.ndarray  # (M,)
    merchant_xy: np.ndarray  # (M, 2)
    group_start: np.ndarray  # (R, K): merchants sorted by (region, category)
    group_size: np.ndarray  # (R, K)
    home_region: np.ndarray  # (C,)
    home_xy: np.ndarray  # (C, 2)
    level: np.ndarray  # (C,) log typical amount
    rate: np.ndarray  # (C,) purchases per day
    peak_hour: np.ndarray  # (C,)
    hour_spread: np.ndarray  # (C,)
    preference_cdf: np.ndarray  # (C, K)
    regulars: np.ndarray  # (C, K, 3) merchant ids


def _build_world(config: TransactionsConfig, rng: np.random.Generator) -> _World:
    n_regions, n_customers = config.n_regions, config.n_customers
    popularity = np.array([p for p, _, _ in CATEGORIES.values()])
    region_xy = rng.uniform((0, 0), (3000, 2000), size=(n_regions, 2))
    region_size = rng.dirichlet(np.full(n_regions, 2.0))
    per_group = 2 + rng.poisson(popularity[None, :] * region_size[:, None] * 60 * n_regions)  # (R, K)
    merchant_region = np.repeat(np.arange(n_regions), per_group.sum(1))
    merchant_category = np.concatenate([np.repeat(np.arange(len(popularity)), row) for row in per_group])
    online = np.array([o for _, _, o in CATEGORIES.values()])
    merchant_xy = region_xy[merchant_region] + rng.normal(0, 20, size=(merchant_region.size, 2))
    merchant_xy[online[merchant_category]] = np.nan  # no place: the purchase happens where the customer is
    group_size = per_group
    group_start = (np.cumsum(per_group.ravel()) - per_group.ravel()).reshape(per_group.shape)

    home_region = rng.choice(n_regions, size=n_customers, p=region_size)
    home_xy = region_xy[home_region] + rng.normal(0, 15, size=(n_customers, 2))
    preference = rng.dirichlet(popularity * 8, size=n_customers)
    regular_pick = rng.integers(0, 1 << 30, size=(n_customers, len(popularity), 3))
    regulars = group_start[home_region][:, :, None] + regular_pick % group_size[home_region][:, :, None]
    return _World(
        region_xy=region_xy,
        merchant_region=merchant_region,
        merchant_category=merchant_category,
        merchant_xy=merchant_xy,
        group_start=group_start,
        group_size=group_size,
        home_region=home_region,
        home_xy=home_xy,
        level=rng.normal(np.log(40), 0.5, size=n_customers),
        rate=rng.gamma(2.0, 1.0, size=n_customers),
        peak_hour=rng.normal(14, 2.5, size=n_customers),
        hour_spread=rng.uniform(2, 4, size=n_customers),
        preference_cdf=np.cumsum(preference, axis=1),
        regulars=regulars,
    )


def _random_merchant(
    world: _World, region: np.ndarray, category: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    size = world.group_size[region, category]
    return world.group_start[region, category] + rng.integers(0, 1 << 30, size=region.size) % size


def _ticket(
    world: _World, customer: np.ndarray, category: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    multiplier = np.array([m for _, m, _ in CATEGORIES.values()])[category]
    return np.exp(world.level[customer] + rng.normal(0, 0.6, size=customer.size)) * multiplier


def _legit(world: _World, config: TransactionsConfig, rng: np.random.Generator) -> pd.DataFrame:
    total_days = config.warmup_days + config.days
    counts = rng.poisson(world.rate * total_days)
    customer = np.repeat(np.arange(config.n_customers), counts)
    day = rng.integers(0, total_days, size=customer.size)
    hour = np.mod(rng.normal(world.peak_hour[customer], world.hour_spread[customer]), 24.0)
    time_h = day * 24.0 + hour
    u = rng.uniform(size=customer.size)
    category = (world.preference_cdf[customer] < u[:, None]).sum(1).clip(max=len(CATEGORIES) - 1)
    regular = rng.uniform(size=customer.size) < 0.85
    merchant = np.where(
        regular,
        world.regulars[customer, category, rng.integers(0, 3, size=customer.size)],
        _random_merchant(world, world.home_region[customer], category, rng),
    )
    # Trips: one customer in ten spends 2–5 days in another city, buying from that city's merchants.
    travels = rng.uniform(size=config.n_customers) < 0.1
    trip_start = rng.uniform(0, total_days - 5, size=config.n_customers) * 24.0
    trip_end = trip_start + rng.uniform(2, 5, size=config.n_customers) * 24.0
    trip_region = (
        world.home_region + rng.integers(1, config.n_regions, size=config.n_customers)
    ) % config.n_regions
    away = travels[customer] & (time_h >= trip_start[customer]) & (time_h < trip_end[customer])
    merchant[away] = _random_merchant(world, trip_region[customer[away]], category[away], rng)
    location = _location(world, merchant, world.home_xy[customer])
    location[away & np.isnan(world.merchant_xy[merchant, 0])] = world.region_xy[trip_region[customer[away]]][
        np.isnan(world.merchant_xy[merchant[away], 0])
    ]
    return pd.DataFrame(
        {
            "customer": customer,
            "time_h": time_h,
            "merchant": merchant,
            "category": category,
            "amount": _ticket(world, customer, category, rng),
            "x": location[:, 0],
            "y": location[:, 1],
            "fraud_type": "",
        }
    )


def _location(world: _World, merchant: np.ndarray, customer_xy: np.ndarray) -> np.ndarray:
    place = world.merchant_xy[merchant].copy()
    online = np.isnan(place[:, 0])
    place[online] = customer_xy[online]
    return place


def _fraud(
    world: _World, config: TransactionsConfig, legit: pd.DataFrame, rng: np.random.Generator
) -> pd.DataFrame:
    n_victims = max(len(FRAUD_TYPES), round(config.fraud_rate * config.n_customers))
    victims = rng.choice(config.n_customers, size=n_victims, replace=False)
    kinds = np.arange(n_victims) % len(FRAUD_TYPES)
    rng.shuffle(kinds)
    start = (config.warmup_days + rng.uniform(0, config.days - 0.1, size=n_victims)) * 24.0
    names = list(CATEGORIES)
    rows: list[pd.DataFrame] = []
    for victim, kind, t0 in zip(victims, kinds, start, strict=True):
        kind_name = FRAUD_TYPES[kind]
        home = world.home_region[victim]
        if kind_name == "card_testing":
            n = int(rng.integers(5, 16))
            times = t0 + np.sort(rng.uniform(0, rng.uniform(10, 30) / 60, size=n))
            category = np.full(n, names.index("online_services"))
            merchant = _random_merchant(world, rng.integers(0, config.n_regions, size=n), category, rng)
            amount = rng.uniform(0.5, 5.0, size=n)
        elif kind_name == "large_amount":
            n = int(rng.integers(1, 3))
            times = t0 + np.sort(rng.uniform(0, 2, size=n))
            category = rng.choice([names.index(c) for c in ("electronics", "jewellery", "travel")], size=n)
            merchant = _random_merchant(world, np.full(n, home), category, rng)
            amount = np.exp(world.level[victim]) * rng.uniform(8, 30, size=n) * 2.5
        elif kind_name == "geo_jump":
            n = int(rng.integers(1, 4))
            at_home = legit[(legit.customer == victim) & (legit.time_h > t0 - 48) & (legit.time_h < t0)]
            anchor = float(at_home.time_h.max()) if len(at_home) else t0
            times = anchor + np.sort(rng.uniform(5, 60, size=n)) / 60
            far = np.argsort(-np.linalg.norm(world.region_xy - world.region_xy[home], axis=1))[
                : max(1, config.n_regions // 3)
            ]
            region = np.full(n, rng.choice(far))
            category = rng.choice(
                [names.index(c) for c in ("clothing", "electronics", "restaurant", "fuel")], size=n
            )
            merchant = _random_merchant(world, region, category, rng)
            amount = _ticket(world, np.full(n, victim), category, rng) * rng.uniform(2, 5, size=n)
        elif kind_name == "odd_hours":
            n = int(rng.integers(2, 5))
            day = np.floor(t0 / 24) * 24
            times = day + np.sort(rng.uniform(1, 5, size=n))
            category = rng.choice(len(names), size=n, p=np.array([p for p, _, _ in CATEGORIES.values()]))
            merchant = _random_merchant(world, np.full(n, home), category, rng)
            amount = _ticket(world, np.full(n, victim), category, rng) * rng.uniform(2, 4, size=n)
        else:  # new_merchant
            n = int(rng.integers(1, 4))
            times = t0 + np.sort(rng.uniform(0, 6, size=n))
            shares = np.diff(world.preference_cdf[victim], prepend=0.0)
            category = np.full(n, int(np.argmin(shares)))
            region = np.full(n, (home + rng.integers(1, config.n_regions)) % config.n_regions)
            merchant = _random_merchant(world, region, category, rng)
            amount = _ticket(world, np.full(n, victim), category, rng) * rng.uniform(2, 5, size=n)
        customer = np.full(n, victim)
        location = _location(world, merchant, world.home_xy[customer])
        rows.append(
            pd.DataFrame(
                {
                    "customer": customer,
                    "time_h": times,
                    "merchant": merchant,
                    "category": category,
                    "amount": amount,
                    "x": location[:, 0],
                    "y": location[:, 1],
                    "fraud_type": kind_name,
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


def _history_features(events: pd.DataFrame, world: _World) -> pd.DataFrame:
    """Per-card features from the card's own past, vectorised over cards sorted by time."""
    events = events.sort_values(["customer", "time_h"], kind="stable").reset_index(drop=True)
    customer = events.customer.to_numpy()
    time_h = events.time_h.to_numpy()
    xy = events[["x", "y"]].to_numpy()
    first = np.r_[True, customer[1:] != customer[:-1]]
    previous = np.r_[0, np.arange(len(events) - 1)]
    km = np.where(first, 0.0, np.linalg.norm(xy - xy[previous], axis=1))
    gap_h = np.where(first, 24.0 * 30, time_h - time_h[previous])
    key = customer * 1e6 + time_h  # hours < 1e6, so the key sorts cards, then time
    in_last_hour = np.arange(len(events)) - np.searchsorted(key, key - 1.0, side="left")

    by_card = events.groupby("customer", sort=False)
    seen_before = by_card.cumcount().to_numpy()
    same_category_before = events.groupby(["customer", "category"], sort=False).cumcount().to_numpy()
    log_amount = np.log(events.amount.to_numpy())
    past_log_sum = by_card["amount"].transform(lambda a: np.log(a).cumsum()).to_numpy() - log_amount
    past_mean = np.where(seen_before > 0, past_log_sum / np.maximum(seen_before, 1), log_amount)
    angle = events.time_h.to_numpy() % 24 / 24 * 2 * np.pi
    sin_sum = pd.Series(np.sin(angle)).groupby(customer).cumsum().to_numpy() - np.sin(angle)
    cos_sum = pd.Series(np.cos(angle)).groupby(customer).cumsum().to_numpy() - np.cos(angle)
    usual_hour = np.mod(np.arctan2(sin_sum, cos_sum) / (2 * np.pi) * 24, 24)
    hour = time_h % 24
    deviation = np.abs((hour - usual_hour + 12) % 24 - 12)
    deviation = np.where(seen_before > 0, deviation, 0.0)

    names = np.array(list(CATEGORIES))
    return pd.DataFrame(
        {
            "customer_id": customer,
            "merchant_id": events.merchant.to_numpy(),
            "time_h": time_h,
            "amount": events.amount.to_numpy().round(2).clip(min=0.01),
            "hour": hour,
            "category": names[events.category.to_numpy()],
            "distance_from_home_km": np.linalg.norm(xy - world.home_xy[customer], axis=1),
            "km_from_prev": km,
            "minutes_since_prev": gap_h * 60,
            "speed_kmh": km / np.maximum(gap_h, 1 / 60),
            "txns_last_hour": in_last_hour.astype(np.float64),
            "amount_to_customer_avg": np.exp(log_amount - past_mean),
            "new_merchant": (~events.duplicated(["customer", "merchant"])).to_numpy().astype(np.float64),
            "category_share": same_category_before / np.maximum(seen_before, 1),
            "hour_deviation": deviation,
            "fraud_type": events.fraud_type.to_numpy(),
        }
    )


def generate_transactions(config: TransactionsConfig | None = None) -> pd.DataFrame:
    """Draw the synthetic transactions of the scored period (see the module docstring), sorted by time.

    Returns:
        One row per purchase: the :data:`ID_COLUMNS`, the features, ``is_fraud`` (0/1) and
        ``fraud_type`` (empty for legitimate purchases).
    """
    config = config or TransactionsConfig()
    rng = np.random.default_rng(config.seed)
    world = _build_world(config, rng)
    legit = _legit(world, config, rng)
    events = pd.concat([legit, _fraud(world, config, legit, rng)], ignore_index=True)
    table = _history_features(events, world)
    table = table[table.time_h >= config.warmup_days * 24.0].sort_values("time_h", kind="stable")
    table = table.reset_index(drop=True)
    seconds = ((table.time_h - config.warmup_days * 24.0) * 3600).round().astype(np.int64)
    table.insert(0, "transaction_id", np.arange(len(table), dtype=np.int64))
    table.insert(3, "timestamp", seconds)
    table = table.drop(columns="time_h")
    table[LABEL] = (table.fraud_type != "").astype(np.int64)
    for column in NUMERIC_FEATURES:
        table[column] = table[column].astype(np.float64).round(4)
    return table[[*ID_COLUMNS, *FEATURES, LABEL, "fraud_type"]]


def split_by_time(table: pd.DataFrame, train_fraction: float = 0.6) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Earlier purchases for training, later ones for testing (what a deployed detector faces)."""
    cut = table.timestamp.quantile(train_fraction)
    return table[table.timestamp <= cut].reset_index(drop=True), table[table.timestamp > cut].reset_index(
        drop=True
    )


def write_table(table: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``table`` as CSV or Parquet (by suffix) atomically."""
    from ebm.anomaly.io import atomic_table_write

    return atomic_table_write(table, path)


def load_creditcard(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """The public credit-card fraud table (``Time, V1…V28, Amount, Class``): features and labels."""
    table = read_table(path, CREDITCARD_SCHEMA)
    return table[list(CREDITCARD_FEATURES)], table["Class"].to_numpy()


def load_table(
    path: str | os.PathLike[str],
    *,
    numeric: tuple[str, ...] = (),
    categorical: tuple[str, ...] = (),
    label: str | None = None,
) -> tuple[pd.DataFrame, np.ndarray | None]:
    """Any CSV/Parquet table with the given feature columns and optional 0/1 label column."""
    schema = TableSchema(
        numeric=numeric, categorical=categorical, label=label, label_required=label is not None
    )
    table = read_table(path, schema)
    labels = table[label].to_numpy() if label is not None else None
    return table[list(schema.features)], labels
