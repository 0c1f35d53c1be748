"""The static leaderboard page: one self-contained HTML file (inline CSS and JS, no server needed).

``{{COUNT}}``, ``{{KNOWEDIT}}`` (KnowEdit's layout of the single-edit results, ``table.knowedit``,
not sortable; empty without such results) and ``{{TABLES}}`` (the ranked tables, ``table.kb``) are
filled in by ``knowbench.leaderboard.render_html``. Clicking a
column header sorts that table by the column: the first click puts the best values first (highest,
or lowest for a lower-is-better column), the next click reverses; empty cells (metrics a run did
not measure) always stay last. The header's ``aria-sort`` attribute tells the current order.
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>knowbench leaderboard</title>
<style>
  body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 72rem;
         padding: 0 1rem; color: #1d2330; line-height: 1.45; }
  h1 { margin-bottom: .2rem; }
  h2 { margin-top: 2.2rem; border-bottom: 1px solid #d6dbe4; padding-bottom: .2rem; }
  h3 { margin: 1.2rem 0 .4rem; font-weight: 600; }
  p.note, p.count { color: #4a5468; max-width: 52rem; }
  table.kb { border-collapse: collapse; margin-bottom: 1rem; font-variant-numeric: tabular-nums; }
  table.kb th, table.kb td { padding: .25rem .6rem; border-bottom: 1px solid #e3e7ee; text-align: right; }
  table.kb th:nth-child(2), table.kb td:nth-child(2), table.kb th:nth-child(3), table.kb td:nth-child(3),
  table.kb th:nth-child(4), table.kb td:nth-child(4), table.kb th:nth-child(6), table.kb td:nth-child(6) {
    text-align: left; }
  table.kb th { background: #f2f4f8; white-space: nowrap; padding: 0; }
  table.kb th button { all: inherit; display: block; width: 100%; box-sizing: border-box; padding: .35rem .6rem;
                       cursor: pointer; font-weight: 600; }
  table.kb th button:focus-visible { outline: 2px solid #3d6fd8; }
  table.kb th[aria-sort="ascending"] button::after { content: " \\25B2"; font-size: .7em; }
  table.kb th[aria-sort="descending"] button::after { content: " \\25BC"; font-size: .7em; }
  table.kb tbody tr:hover { background: #f7f9fc; }
  code { background: #f2f4f8; padding: 0 .25rem; border-radius: 3px; }
  table.knowedit, table.lifelong { border-collapse: collapse; margin-bottom: .4rem; font-variant-numeric: tabular-nums; }
  table.knowedit th, table.knowedit td, table.lifelong th, table.lifelong td { padding: .25rem .6rem; border-bottom: 1px solid #e3e7ee; text-align: right; }
  table.knowedit thead th, table.lifelong thead th { background: #f2f4f8; white-space: nowrap; }
  table.knowedit thead th:nth-child(-n+2) { text-align: left; }
  table.knowedit th[scope="rowgroup"], table.knowedit th[scope="row"] { text-align: left; font-weight: 600; }
  table.knowedit th[scope="row"], table.lifelong th[scope="row"] { font-weight: normal; white-space: nowrap; }
  table.knowedit tr.task th { background: #f7f9fc; }
  p.footnote { color: #4a5468; font-size: .9em; max-width: 60rem; margin: .2rem 0; }
</style>
</head>
<body>
<h1>knowbench leaderboard</h1>
<p class="note">Knowledge editors ranked per task, protocol and metric protocol on KnowEdit's columns
(results under different metric protocols are never ranked together), generated from validated result files. Accuracies are teacher-forced token accuracies &times;100; Fluency is weighted n-gram entropy
&times;100; ConvSent's Locality is a KL divergence (lower is better, &darr;). An empty cell is a metric the run
did not measure, never 0. A row averages the seeds listed in its Seeds column. Click a column header to sort.</p>
<p class="count">{{COUNT}}Submit a run with <code>knowbench submit RESULT.json</code>.</p>
{{KNOWEDIT}}
{{TABLES}}
<script>
(function () {
  "use strict";
  function cellValue(td, numeric) {
    var raw = td.hasAttribute("data-value") ? td.getAttribute("data-value") : td.textContent.trim();
    if (raw === "") return null;
    return numeric ? parseFloat(raw) : raw.toLowerCase();
  }
  function sortTable(table, th, col) {
    var state = th.getAttribute("aria-sort");
    var first = th.getAttribute("data-first") === "desc" ? "descending" : "ascending";
    var dir = state === "none" ? first : (state === "ascending" ? "descending" : "ascending");
    var heads = table.tHead.rows[0].cells;
    for (var h = 0; h < heads.length; h++) heads[h].setAttribute("aria-sort", "none");
    th.setAttribute("aria-sort", dir);
    var numeric = th.getAttribute("data-type") === "num";
    var body = table.tBodies[0];
    var rows = [];
    for (var i = 0; i < body.rows.length; i++) {
      rows.push({ tr: body.rows[i], i: i, v: cellValue(body.rows[i].cells[col], numeric) });
    }
    rows.sort(function (a, b) {
      if (a.v === null || b.v === null) return ((a.v === null) - (b.v === null)) || (a.i - b.i);
      var c = numeric ? a.v - b.v : (a.v < b.v ? -1 : a.v > b.v ? 1 : 0);
      return (dir === "ascending" ? c : -c) || (a.i - b.i);
    });
    for (var r = 0; r < rows.length; r++) body.appendChild(rows[r].tr);
  }
  var tables = document.querySelectorAll("table.kb");
  for (var t = 0; t < tables.length; t++) {
    (function (table) {
      var heads = table.tHead.rows[0].cells;
      for (var c = 0; c < heads.length; c++) {
        (function (th, col) {
          th.addEventListener("click", function () { sortTable(table, th, col); });
        })(heads[c], c);
      }
    })(tables[t]);
  }
})();
</script>
</body>
</html>
"""
