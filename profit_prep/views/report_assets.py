"""The report page's inline CSS and scripts (views/report.py writes them into every page)."""

CSS = """
:root { --fg:#1d2330; --muted:#6b7280; --line:#e5e7eb; --bad:#b91c1c; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg);
       margin: 0 auto; max-width: 1200px; padding: 20px 28px 60px; background: #fafafa; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 10px; }
.meta { color: var(--muted); margin: 0 0 16px; } code { font-size: 12.5px; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px; }
.card b { display: block; font-size: 19px; } .card span { color: var(--muted); font-size: 12px; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(340px, 1fr)); gap: 12px; }
figure.plot { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 8px;
              padding: 6px; } figure.plot svg { width: 100%; height: auto; display: block; }
figure.plot figcaption { color: var(--muted); font-size: 12px; padding: 2px 6px; }
.tables { display: grid; grid-template-columns: repeat(auto-fit, minmax(260px, 1fr)); gap: 12px; }
table { border-collapse: collapse; background: #fff; width: 100%; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 3px 8px; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.controls { position: sticky; top: 0; background: #fafafa; padding: 8px 0; z-index: 2;
            display: flex; gap: 10px; align-items: center; flex-wrap: wrap;
            border-bottom: 1px solid var(--line); }
.controls button { padding: 3px 10px; } .controls input[type=search] { width: 220px; }
.example { background: #fff; border: 1px solid var(--line); border-radius: 8px; margin: 12px 0;
           padding: 8px 12px; }
.example h3 { font-size: 13px; margin: 0 0 6px; font-weight: 600; }
.example h3 .st { color: var(--muted); font-weight: 400; }
.text { white-space: pre-wrap; word-break: break-word; margin: 0;
        font: 13px/1.6 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.prompt { color: #9ca3af; } body.hide-prompt .prompt { display: none; }
.tok { border-radius: 2px; box-shadow: inset -1px 0 0 rgba(0, 0, 0, .10); } /* token edges */
.tok:hover { outline: 1px solid #111; }
.p0 { background: #fecaca; } .p1 { background: #fed7aa; } .p2 { background: #fde68a; }
.p3 { background: #fef08a; } .p4 { background: #fef9c3; } .p5 { background: #ecfccb; }
.p6 { background: #d9f99d; } .p7 { background: #bbf7d0; } .p8 { background: #a7f3d0; }
.p9 { background: #d1fae5; }
.tok.masked { background: var(--bad); color: #fff; text-decoration: line-through;
              text-decoration-thickness: 1px; }
/* --color-by: quantile buckets low .. high; masked tokens keep the bucket, struck in red */
.tok.q0 { background: #e0e7ff; } .tok.q1 { background: #bae6fd; } .tok.q2 { background: #a7f3d0; }
.tok.q3 { background: #fde68a; } .tok.q4 { background: #fca5a5; }
.tok.masked.qv { color: var(--bad); font-weight: 600; }
.tok.masked.qv:not(.q0):not(.q1):not(.q2):not(.q3):not(.q4) { background: none; }
/* --compare: which rule keeps the token */
.cmp-both { background: #d1fae5; } .cmp-a { background: #bfdbfe; font-weight: 600; }
.cmp-b { background: #fed7aa; font-weight: 600; }
.cmp-none { background: var(--bad); color: #fff; text-decoration: line-through; }
.legend span { padding: 0 5px; margin-right: 2px; }
.note { color: var(--muted); font-size: 12.5px; }
"""

JS = """
(function () {
  var perPage = PER_PAGE, page = 0;
  var all = Array.prototype.slice.call(document.querySelectorAll('.example'));
  var shown = all;
  var q = document.getElementById('filter'), info = document.getElementById('pageinfo');
  function render() {
    var pages = Math.max(1, Math.ceil(shown.length / perPage));
    page = Math.min(Math.max(page, 0), pages - 1);
    all.forEach(function (el) { el.hidden = true; });
    shown.slice(page * perPage, (page + 1) * perPage).forEach(function (el) { el.hidden = false; });
    info.textContent = 'page ' + (page + 1) + ' of ' + pages + ' (' + shown.length +
      ' example' + (shown.length === 1 ? '' : 's') + ')';
    document.body.dataset.page = String(page + 1);
  }
  document.getElementById('prev').onclick = function () { page--; render(); };
  document.getElementById('next').onclick = function () { page++; render(); };
  q.oninput = function () {
    var needle = q.value.toLowerCase();
    shown = all.filter(function (el) {
      return !needle || el.textContent.toLowerCase().indexOf(needle) >= 0;
    });
    page = 0; render();
  };
  document.getElementById('onlymasked').onchange = function (e) {
    document.body.classList.toggle('hide-prompt', e.target.checked);
  };
  render();
  document.body.dataset.ready = '1';
})();
"""

# Runs first: any later script error or console.error lands in a DOM attribute, so a headless
# browser's --dump-dom (and a person with devtools closed) can see it.
ERROR_HOOK = """
window.__errors = [];
function __record(msg) {
  window.__errors.push(String(msg));
  document.documentElement.setAttribute('data-js-errors', window.__errors.join(' | '));
}
window.onerror = function (msg, src, line) { __record(msg + ' @' + line); };
var __consoleError = console.error;
console.error = function () { __record(Array.prototype.join.call(arguments, ' '));
                              __consoleError.apply(console, arguments); };
"""
