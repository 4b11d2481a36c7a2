"""Errors a user can act on: the CLI prints them as one line, Airflow shows them as the task's failure."""


class PipelineError(Exception):
    """Bad input or a missing prerequisite, with a message naming the file, the line and the rule."""

    exit_code = 2  # the CLI's exit status


class Interrupted(PipelineError):
    """Ctrl-C, saying what was kept and how to go on; the exit status a shell gives a command that SIGINT ended."""

    exit_code = 130


class ServiceUnavailable(PipelineError):
    """A service the pipeline needs (the tracking server) did not answer: unlike bad input, worth a retry."""
