"""Services inside environments: dependency order, health gates, restarts, logs.

They are driven through the provider's ``exec`` only, with a small shell
wrapper inside the environment that keeps each service's pid, output files
and exit code under ``/tmp/.vendetta/svc/NAME``. That works for every provider
with a POSIX shell, and lets services outlive an agent restart: the agent
finds them again by their pid files and resumes supervising and tailing them.
"""
