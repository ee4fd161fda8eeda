"""shortened: depth pruning of LLMs as a job service. The shared package: specs, settings, the job-kind table, admission, planning, storage, client, CLI, and ``engine/``."""
