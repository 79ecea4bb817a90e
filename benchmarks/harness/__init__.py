"""The amalgamation benchmark's parts: dataset specs (:mod:`.spec`), the row registry (:mod:`.rows`),
the setting built from a spec (:mod:`.setup`), diagnostics (:mod:`.diagnostics`) and tables (:mod:`.report`)."""
