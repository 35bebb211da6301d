// What the page shows as its answer, from an /api/predict body. The decision itself (possible Mpox - refer,
// uncertain - refer to a clinician, or the class) is made once, on the server, by the same rule as
// `mpoxscope predict`; this file only chooses how to show it and never recomputes it.
// Loaded by index.html before app.js; also loadable by Node (module.exports) so tests can check it.
"use strict";

(function (root) {
  const FALLBACK = "uncertain \u2014 refer to a clinician";

  function pct(p) {
    return (100 * p).toFixed(p >= 0.995 || p < 0.001 ? 0 : 1) + "%";
  }

  // -> { kind, headline, alert, detail }: headline is the decision text, word for word; alert is true for
  // every referral (screening or uncertain); detail is the server's explanation of it.
  function view(result) {
    const d = result && result.decision;
    if (!d || typeof d.text !== "string" || !d.text) {
      return { kind: "uncertain", headline: FALLBACK, alert: true,
        detail: "The server sent no decision for this photo. Please refer to a clinician." };
    }
    const top = typeof result.top_probability === "number" && isFinite(result.top_probability)
      ? result.top_class + " (" + pct(result.top_probability) + ")" : "none";
    return {
      kind: d.kind,
      headline: d.text,
      alert: d.kind !== "class",
      detail: typeof result.message === "string" ? result.message : "",
      topLine: "Most likely class: " + top + ".",
    };
  }

  // The screening rule in the model facts, e.g. "Mpox at 12.5% or more (chosen on validation for 90% ...)".
  function screeningFact(info) {
    const s = info && info.screening;
    if (!s || typeof s.threshold !== "number") return "";
    const why = typeof s.target_sensitivity === "number"
      ? " (chosen on validation for " + pct(s.target_sensitivity) + " " + s.target_class + " sensitivity)" : "";
    return "when P(" + s.target_class + ") \u2265 " + pct(s.threshold) + why;
  }

  const api = { view: view, screeningFact: screeningFact, pct: pct };
  root.mpoxDecision = api;
  if (typeof module !== "undefined" && module.exports) module.exports = api;
})(typeof window !== "undefined" ? window : globalThis);
