"""What the lisa-finetune tests share: flags for a run of seconds, and the one-line error a refused command prints."""

from lisa_trainer.cli import main

FAST = ["--max_steps", "4", "--lisa_interval_steps", "2", "--block_size", "48", "--per_device_train_batch_size", "2",
        "--disable_tqdm", "--eval_steps", "2"]


def error_of(argv, capsys):
    """The error ``main(argv)`` prints to stderr, asserting it exits with status 2."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse rejects a value
        code = e.code
    assert code == 2
    return capsys.readouterr().err
