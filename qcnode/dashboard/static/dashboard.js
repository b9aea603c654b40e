// Draws every .chart[data-figure] with the Plotly.js served by qcnode (no CDN). A click on a point
// whose customdata is a series id (the score vs SSDE scatter) opens that series.
(function () {
  function draw() {
    if (!window.Plotly) { return; }
    var base = document.body.getAttribute("data-base") || "";
    document.querySelectorAll(".chart[data-figure]").forEach(function (el) {
      var fig = JSON.parse(el.getAttribute("data-figure"));
      Plotly.newPlot(el, fig.data, fig.layout, {responsive: true, displaylogo: false}).then(function () {
        el.setAttribute("data-rendered", String(fig.data.length));
      });
      if (el.id === "chart-scatter") {
        el.on("plotly_click", function (ev) {
          var id = ev.points && ev.points[0] && ev.points[0].customdata;
          if (id) { window.location.href = base + "/series/" + id; }
        });
      }
    });
  }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", draw); } else { draw(); }
})();
