// One-key decisions: a key clicks the button or link marked data-key="<key>" on the page.
// Typing in a field never triggers one. No inline script anywhere (strict CSP).
(function () {
  "use strict";
  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    var target = event.target;
    var tag = target && target.tagName ? target.tagName.toLowerCase() : "";
    if (tag === "input" || tag === "textarea" || tag === "select" || (target && target.isContentEditable)) {
      return;
    }
    var key = event.key;
    var control = null;
    var candidates = document.querySelectorAll("[data-key]");
    for (var i = 0; i < candidates.length; i++) {
      if (candidates[i].getAttribute("data-key") === key) {
        control = candidates[i];
        break;
      }
    }
    if (control) {
      event.preventDefault();
      control.click();
    }
  });
})();
