"""Run Splink (DuckDB backend) on a benchmark CSV: `python run_splink.py IN OUT [THRESHOLD]`.

Standalone: it runs in Splink's own venv (bench/matching/setup_splink.sh), never in crmhub's,
and imports nothing from crmhub. The input columns are already canonical (folded names,
normalised email key, E.164 phone, company without legal suffix), the same inputs crmhub gets.

Configured as Splink's documentation recommends for person data: name comparisons with
term-frequency adjustment, exact normalised email (not the username-rewarding
EmailComparison, which the issue showed collapses at scale), exact phone with term-frequency
adjustment (shared switchboard numbers), prior from deterministic rules, u by random
sampling, m by EM in two sessions (blocked on name, blocked on email); predict and cluster at
the threshold (default 0.9). Writes `unique_id,cluster_id` and prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time

import duckdb
import splink.comparison_library as cl
from splink import DuckDBAPI, Linker, SettingsCreator, block_on


def main(argv: list[str]) -> None:
    src, out = argv[0], argv[1]
    threshold = float(argv[2]) if len(argv) > 2 else 0.9
    start = time.perf_counter()
    con = duckdb.connect()
    rel = con.sql(
        f"""
        SELECT unique_id,
               nullif(first_name_norm, '') AS first_name,
               nullif(last_name_norm, '') AS surname,
               nullif(email_key, '') AS email,
               nullif(phone, '') AS phone,
               nullif(company_key, '') AS company,
               nullif(city, '') AS city
        FROM read_csv('{src}', all_varchar = true, header = true)
        """
    )
    db_api = DuckDBAPI(con)
    df = db_api.register(rel, dataset_display_name="contacts")
    settings = SettingsCreator(
        link_type="dedupe_only",
        comparisons=[
            cl.NameComparison("first_name").configure(term_frequency_adjustments=True),
            cl.NameComparison("surname").configure(term_frequency_adjustments=True),
            cl.ExactMatch("email").configure(term_frequency_adjustments=True),
            cl.ExactMatch("phone").configure(term_frequency_adjustments=True),
            cl.JaroWinklerAtThresholds("company", [0.9]).configure(term_frequency_adjustments=True),
            cl.ExactMatch("city").configure(term_frequency_adjustments=True),
        ],
        blocking_rules_to_generate_predictions=[
            block_on("email"),
            block_on("phone"),
            block_on("first_name", "surname"),
            block_on("surname", "company"),
        ],
        retain_intermediate_calculation_columns=False,
        retain_matching_columns=False,
    )
    linker = Linker(df, settings, log_level=None)
    loaded = time.perf_counter()
    linker.training.estimate_probability_two_random_records_match(
        [block_on("email"), block_on("first_name", "surname", "company")], recall=0.7
    )
    linker.training.estimate_u_using_random_sampling(max_pairs=5e6, seed=1)
    linker.training.estimate_parameters_using_expectation_maximisation(
        block_on("first_name", "surname")
    )
    linker.training.estimate_parameters_using_expectation_maximisation(block_on("email"))
    predictions = linker.inference.predict(threshold_match_probability=threshold)
    clusters = linker.clustering.cluster_pairwise_predictions_at_threshold(
        predictions, threshold_match_probability=threshold
    )
    clusters.as_duckdbpyrelation().select("unique_id, cluster_id").write_csv(out)
    done = time.perf_counter()
    pairs = con.sql(f"SELECT count(*) FROM {predictions.physical_name}").fetchall()[0]
    print(
        json.dumps(
            {
                "load_seconds": loaded - start,
                "match_seconds": done - loaded,
                "predicted_pairs_above_threshold": pairs[0] if pairs else None,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
