# The batch-size study ("when does one big step pay?"), included from the
# Makefile (PY, STAMP and the exported ACCUMULATE_DATA_DIR come from there).
#   make study         the full study into results/study (~40 min on 2 cores)
#   make study-quick   smoke test of every arm into /tmp/accumulate-study-quick (~2 min)
#   make study-report  rebuild results/study/report.md and figures from its runs
STUDY_OUT ?= results/study
STUDY_JOBS ?= 2
# No run starts after 40 minutes, so that the study ends within about 45
# (runs left out are listed in study.json and report.md).
STUDY_ARGS ?= --max-minutes 40

.PHONY: study study-quick study-report

study: $(STAMP)
	$(PY) -m accumulate study --out $(STUDY_OUT) --jobs $(STUDY_JOBS) $(STUDY_ARGS)

study-quick: $(STAMP)
	$(PY) -m accumulate study --quick --out /tmp/accumulate-study-quick --jobs $(STUDY_JOBS)

study-report: $(STAMP)
	$(PY) -m accumulate study --report-only --out $(STUDY_OUT)
