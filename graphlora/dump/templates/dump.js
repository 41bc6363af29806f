(function () {
  "use strict";
  var tbody = document.getElementById("node-rows");
  var all = Array.prototype.slice.call(tbody.querySelectorAll("tr"));
  var keys = ["component", "role", "layer", "lora", "module", "q"];
  var controls = {};
  keys.forEach(function (k) { controls[k] = document.getElementById("f-" + k); });

  function parseHash() {
    var out = {};
    var h = window.location.hash.replace(/^#/, "");
    if (!h) { return out; }
    h.split("&").forEach(function (part) {
      var i = part.indexOf("=");
      if (i <= 0) { return; }
      var k = decodeURIComponent(part.slice(0, i)), v = decodeURIComponent(part.slice(i + 1).replace(/\+/g, " "));
      if (keys.indexOf(k) >= 0) { out[k] = v; }
    });
    return out;
  }
  function current() {
    var f = {};
    keys.forEach(function (k) { var c = controls[k]; if (c && c.value.trim()) { f[k] = c.value.trim(); } });
    return f;
  }
  function alternatives(v) { return v.split("|").map(function (s) { return s.trim(); }).filter(Boolean); }
  function layerOk(spec, value) {
    if (value === "") { return false; }
    var n = parseInt(value, 10);
    return alternatives(spec).some(function (alt) {
      var m = alt.match(/^(\d+)\s*-\s*(\d+)$/);
      if (m) { return n >= parseInt(m[1], 10) && n <= parseInt(m[2], 10); }
      return parseInt(alt, 10) === n;
    });
  }
  function globOk(spec, value) {
    return alternatives(spec).some(function (alt) {
      var re = new RegExp("^" + alt.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".") + "$");
      return re.test(value);
    });
  }
  function matches(tr, f) {
    var d = tr.dataset;
    if (f.component && alternatives(f.component).indexOf(d.component) < 0) { return false; }
    if (f.role && alternatives(f.role).indexOf(d.role) < 0) { return false; }
    if (f.layer && !layerOk(f.layer, d.layer)) { return false; }
    if (f.lora) {
      var want = alternatives(f.lora);
      var status = d.lora, fused = d.fusion.indexOf("fused") === 0;
      if (!want.some(function (w) { return w === status || (w === "fused" && fused); })) { return false; }
    }
    if (f.module && !globOk(f.module, d.module)) { return false; }
    if (f.q && tr.textContent.toLowerCase().indexOf(f.q.toLowerCase()) < 0) { return false; }
    return true;
  }
  function render() {
    var f = current();
    var shown = all.filter(function (tr) { return matches(tr, f); });
    while (tbody.firstChild) { tbody.removeChild(tbody.firstChild); }
    var frag = document.createDocumentFragment();
    shown.forEach(function (tr) { frag.appendChild(tr); });
    tbody.appendChild(frag);
    var sites = shown.filter(function (tr) { return tr.dataset.lora === "yes"; }).length;
    var count = document.getElementById("count");
    count.textContent = shown.length + " of " + all.length + " nodes shown, " + sites + " with LoRA";
    count.setAttribute("data-shown", String(shown.length));
    count.setAttribute("data-total", String(all.length));
    document.body.setAttribute("data-filter", keys.filter(function (k) { return f[k]; }).map(function (k) { return k + "=" + f[k]; }).join("&"));
  }
  function toControls(f) {
    keys.forEach(function (k) {
      var c = controls[k];
      if (!c) { return; }
      var v = f[k] || "";
      if (c.tagName === "SELECT" && v && !Array.prototype.some.call(c.options, function (o) { return o.value === v; })) {
        var o = document.createElement("option"); o.value = v; o.textContent = v; c.appendChild(o);
      }
      c.value = v;
    });
  }
  function toHash() {
    var f = current();
    var h = keys.filter(function (k) { return f[k]; }).map(function (k) { return k + "=" + encodeURIComponent(f[k]).replace(/%7C/g, "|"); }).join("&");
    if (window.history && window.history.replaceState) {
      window.history.replaceState(null, "", h ? "#" + h : window.location.pathname + window.location.search);
    }
  }
  keys.forEach(function (k) {
    var c = controls[k];
    if (c) { c.addEventListener("input", function () { toHash(); render(); }); c.addEventListener("change", function () { toHash(); render(); }); }
  });
  document.getElementById("f-clear").addEventListener("click", function () { toControls({}); toHash(); render(); });
  window.addEventListener("hashchange", function () { toControls(parseHash()); render(); });
  Array.prototype.forEach.call(document.querySelectorAll("#component-map g.node"), function (g) {
    var t = g.querySelector("title");
    if (!t) { return; }
    g.addEventListener("click", function () {
      var parts = t.textContent.split("/");
      var f = current();
      f.component = parts[0];
      if (parts.length > 1) { f.layer = parts[1]; } else { delete f.layer; }
      toControls(f); toHash(); render();
      document.getElementById("nodes").scrollIntoView();
    });
  });
  toControls(parseHash());
  render();
})();
