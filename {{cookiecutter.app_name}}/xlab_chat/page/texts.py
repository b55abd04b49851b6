"""Every string the page shows, in Chinese and English (UI_LANGUAGE picks one)."""

from __future__ import annotations

from typing import Dict

TEXT: Dict[str, Dict[str, str]] = {
    "zh": {
        "model": "模型",
        "runs_on": "运行于",
        "checking": "正在检查模型仓库",
        "waiting": "另一个进程正在下载模型，等待中",
        "downloading": "正在下载模型",
        "verifying": "正在校验模型文件",
        "loading": "正在加载模型",
        "connecting": "正在连接推理服务",
        "ready": "模型已就绪",
        "failed": "模型无法启动",
        "how_to_fix": "解决办法",
        "elapsed": "已用 {seconds} 秒",
        "still_loading": "模型仍在加载（{percent}%），请稍后再试。",
        "not_ready_failed": "模型无法启动，请查看页面上的错误信息。",
        "placeholder": "输入消息，按 Enter 发送",
        "placeholder_loading": "模型加载完成后即可聊天……",
        "submit": "发送",
        "stop": "停止",
        "clear": "清空",
        "settings": "生成参数",
        "system_prompt": "系统提示词（留空则使用模型默认）",
        "max_new_tokens": "最大生成长度（token）",
        "temperature": "温度（0 为贪心解码）",
        "top_p": "Top-p",
        "repetition_penalty": "重复惩罚",
        "examples": "示例",
        "empty": "请输入内容。",
        "too_long": "消息太长：共 {tokens} 个 token，而模型最多只能读取 {limit} 个。请缩短后再试。",
        "too_long_server": "消息太长，超出了模型的上下文长度。请缩短后再试。",
        "starting": "正在启动 {engine}",
        "dropped": "为适应模型的上下文长度，最早的 {count} 轮对话已被省略。",
        "generation_failed": "生成失败（{error}），请重试。",
        "restarting": "模型进程意外退出，正在重新加载",
        "engine_stopped": "模型进程意外退出，这条回复没有写完。模型正在重新加载，稍后请重新发送。",
        "still_restarting": "模型正在重新加载，请稍后再试。",
        "queue_place": "⏳ 正在排队：你是第 {place} 位。轮到你时会自动开始回复，请不要关闭页面。",
        "queue_full": "现在使用的人太多，排队已满（{waiting} 人在等待）。请过一会儿再发送。",
    },
    "en": {
        "model": "Model",
        "runs_on": "Runs on",
        "checking": "Checking the model repo",
        "waiting": "Another process is downloading the model; waiting",
        "downloading": "Downloading the model",
        "verifying": "Verifying the model files",
        "loading": "Loading the model",
        "connecting": "Connecting to the engine server",
        "ready": "Model ready",
        "failed": "The model could not start",
        "how_to_fix": "How to fix",
        "elapsed": "{seconds} s elapsed",
        "still_loading": "The model is still loading ({percent}%). Please try again in a moment.",
        "not_ready_failed": "The model could not start; see the error on the page.",
        "placeholder": "Type a message and press Enter",
        "placeholder_loading": "You can chat once the model has loaded…",
        "submit": "Send",
        "stop": "Stop",
        "clear": "Clear",
        "settings": "Generation settings",
        "system_prompt": "System prompt (empty: the model's default)",
        "max_new_tokens": "Max new tokens",
        "temperature": "Temperature (0 = greedy)",
        "top_p": "Top-p",
        "repetition_penalty": "Repetition penalty",
        "examples": "Examples",
        "empty": "Please type a message.",
        "too_long_server": "The message is too long for the model's context. Please shorten it.",
        "starting": "Starting {engine}",
        "too_long": "The message is too long: {tokens} tokens, and this model reads at most {limit}. "
        "Please shorten it.",
        "dropped": "The oldest {count} turn(s) were left out to fit the model's context.",
        "generation_failed": "Generation failed ({error}). Please try again.",
        "restarting": "The model process stopped; reloading the model",
        "engine_stopped": "The model process stopped before this reply was finished. The model is reloading: "
        "please send your message again in a moment.",
        "still_restarting": "The model is reloading. Please try again in a moment.",
        "queue_place": "⏳ You are number {place} in line. Your reply starts by itself when it is your turn; keep this "
        "page open.",
        "queue_full": "Too many people are chatting right now: the queue is full ({waiting} waiting). "
        "Please send your message again in a moment.",
    },
}


def texts(language: str) -> Dict[str, str]:
    return TEXT.get(language, TEXT["en"])
