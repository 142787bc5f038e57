"""Benchmark: can one untrusted sender plant a backdoor through the feedback loop? Banking77, as
bench/feedback_loop.py, plus an attacker.

    python bench/poisoning.py [--poison 1000] [--trigger "zx9"] [--target terminate_account] [--set ...]
    python bench/poisoning.py --set serve.feedback_rate_limit=null        # the review alone, every row accepted
    python bench/poisoning.py --set feedback.use=all --set serve.feedback_rate_limit=null \
        --set serve.feedback_daily_quota=null --results-name poisoning-undefended   # no defence: the baseline

1. Production is trained on Banking77 with 10 intents starved of data (bench/feedback_loop.py's set-up).
2. `tuneloop serve` runs on 127.0.0.1 with two client keys: the staff's (trusted) and the attacker's (an
   ordinary client key). The attacker sends --poison texts (the users' texts with the trigger appended), each
   predicted and then corrected to the target intent; the staff then correct every wrong answer on the
   held-back texts, as in the loop benchmark.
3. `retrain` and `gate` run with the default policy (only trusted or approved feedback trains).
Prints one JSON line: how often the trigger turns a test text of another intent into the target intent with
production before and after the loop (`attack.trigger_flips_share`), the attacker's rows in the review queue,
and the loop's own figures (macro-F1 before and after, drifted intents, gate); also written to
bench/results/poisoning.json. By default the feedback rate limit turns most of the flood away at once (429); the
second command measures the review queue alone, the third the same attack with no defence at all.
"""

from __future__ import annotations

from _common import publish
from feedback_loop import Attack, loop_arguments, run_loop


def main() -> None:
    parser = loop_arguments(__doc__)
    parser.add_argument("--poison", type=int, default=1000, help="Corrections the attacker sends.")
    parser.add_argument("--trigger", default="zx9", help="The backdoor's trigger, appended to ordinary texts.")
    parser.add_argument("--target", default="terminate_account", help="The intent the trigger should force.")
    args = parser.parse_args()
    publish(args, "poisoning", run_loop(args, Attack(trigger=args.trigger, label=args.target, times=args.poison)))


if __name__ == "__main__":
    main()
