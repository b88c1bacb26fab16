// Renders an Ollama TEMPLATE with Go's text/template, the way Ollama fills it for a chat:
// .System holds the chat's system messages, .Messages every message. Reads
// {"template": ..., "messages": [{"role": ..., "content": ...}]} on stdin, writes the text.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var in struct {
		Template string    `json:"template"`
		Messages []Message `json:"messages"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	var system []string
	for _, m := range in.Messages {
		if m.Role == "system" {
			system = append(system, m.Content)
		}
	}
	t := template.Must(template.New("t").Parse(in.Template))
	values := map[string]any{"System": strings.Join(system, "\n\n"), "Messages": in.Messages}
	if err := t.Execute(os.Stdout, values); err != nil {
		panic(err)
	}
}
